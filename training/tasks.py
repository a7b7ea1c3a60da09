"""Fine-tuning task data: reading labelled files, mapping labels to ids, and the task registry.

Files are TSV, CSV, JSONL or Parquet with configurable columns. Every problem is
reported with the file (and line, where there is one) and what was expected.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataprep.errors import ScratchgptError


class TaskDataError(ScratchgptError, ValueError):
    """A task file that cannot be used; the message names the file, line or column."""


@dataclass
class Example:
    text: str
    label: Any = None  # classification: the raw label; sft: the response
    prompt: str | None = None


def _read_delimited(path: Path, delimiter: str) -> list[tuple[int, dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        # SST-2 style files hold quotes inside text; only CSV uses quoting.
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        rows = []
        for row in reader:
            if None in row:  # more cells than header columns
                raise TaskDataError(f"{path}:{reader.line_num}: more fields than the header has")
            if None in row.values():  # fewer cells: DictReader fills the missing columns with None
                given = sum(value is not None for value in row.values())
                raise TaskDataError(f"{path}:{reader.line_num}: fewer fields than the header has "
                                    f"({given} of {len(row)})")
            rows.append((reader.line_num, row))
        return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            rows.append((line_no, record))
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    return [(i + 1, row) for i, row in enumerate(pq.read_table(path).to_pylist())]


READERS: dict[str, Callable[[Path], list[tuple[int, dict[str, Any]]]]] = {
    ".tsv": lambda p: _read_delimited(p, "\t"),
    ".csv": lambda p: _read_delimited(p, ","),
    ".jsonl": _read_jsonl,
    ".json": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line or row number, record) pairs of a task file; refuses an empty one."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise TaskDataError(f"{path}: unknown task file type {path.suffix!r}; use one of {sorted(READERS)}")
    if not path.is_file():
        raise TaskDataError(f"{path}: file does not exist")
    try:
        rows = reader(path)
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    if not rows:
        raise TaskDataError(f"{path}: the task file has no examples")
    return rows


def _column(path: Path, line: int, row: dict[str, Any], key: str, role: str) -> Any:
    if key not in row:
        raise TaskDataError(
            f"{path}:{line}: no {role} column {key!r}; the columns are {sorted(row)} "
            f"(set finetune.tasks[].{role}_key)"
        )
    return row[key]


class Examples(list[Example]):
    """The examples of one task file, and where the rows set aside because their text is empty were."""

    def __init__(self, examples: list[Example], empty_skipped: list[str]) -> None:
        super().__init__(examples)
        self.empty_skipped = empty_skipped  # "file:line" of each skipped row


def empty_skipped(examples: list[Example]) -> list[str]:
    """Where the rows skipped for empty text were; none for a registered kind that returns a plain list."""
    return examples.empty_skipped if isinstance(examples, Examples) else []


def _label(path: Path, line: int, row: dict[str, Any], key: str) -> Any:
    """The label with surrounding whitespace stripped (`pos ` is `pos`); a missing one is refused, as it would
    otherwise become a class of its own ("None" or "")."""
    label = _column(path, line, row, key, "label")
    if isinstance(label, str):
        label = label.strip()
    if label is None or label == "":
        raise TaskDataError(f"{path}:{line}: the label column {key!r} is {'null' if label is None else 'empty'}")
    return label


def read_classification(path: str | Path, text_key: str, label_key: str) -> Examples:
    """The file's examples; rows whose text is empty, blank or null are skipped and their places kept."""
    path = Path(path)
    examples, skipped = [], []
    for line, row in read_rows(path):
        text = _column(path, line, row, text_key, "text")
        if text is None or not str(text).strip():  # nothing to learn from, whatever its label
            skipped.append(f"{path}:{line}")
            continue
        examples.append(Example(text=str(text), label=_label(path, line, row, label_key)))
    if not examples:
        raise TaskDataError(f"{path}: every row's text column {text_key!r} is empty")
    return Examples(examples, skipped)


def _present(path: Path, line: int, row: dict[str, Any], key: str, role: str) -> str:
    value = _column(path, line, row, key, role)
    if value is None:  # JSON null or a Parquet null: str() would train on the text "None"
        raise TaskDataError(f"{path}:{line}: the {role} column {key!r} is null")
    return str(value)


def read_sft(path: str | Path, prompt_key: str, response_key: str) -> list[Example]:
    path = Path(path)
    return [
        Example(
            prompt=_present(path, line, row, prompt_key, "prompt"),
            text=_present(path, line, row, response_key, "response"),
        )
        for line, row in read_rows(path)
    ]


@dataclass
class LabelMap:
    """Labels of any type (strings, ints, bools) mapped to class ids, in a stable order."""

    labels: list[str] = field(default_factory=list)

    @classmethod
    def from_examples(cls, examples: list[Example]) -> LabelMap:
        return cls(sorted({str(e.label) for e in examples}))

    def ids(self, examples: list[Example], source: str) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        unseen = sorted({str(e.label) for e in examples} - index.keys())
        if unseen:
            raise TaskDataError(
                f"{source}: label(s) {unseen} do not occur in the training file; known labels: {self.labels}"
            )
        return [index[str(e.label)] for e in examples]

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelMap:
        return cls(list(data["labels"]))


def truncate(ids: list[int], limit: int, side: str) -> tuple[list[int], bool]:
    """Cut a token list to `limit`, keeping the end ('left' cuts the start) or the start ('right')."""
    if len(ids) <= limit:
        return ids, False
    return (ids[-limit:] if side == "left" else ids[:limit]), True


# Task kinds by name; users register their own with `@register_task("name")` on a class
# that implements `load(task_config) -> (train_examples, eval_examples)`.
TASK_KINDS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        TASK_KINDS[name] = cls
        return cls

    return add


def task_kind(name: str) -> type:
    if name not in TASK_KINDS:
        raise TaskDataError(f"task kind {name!r} is not registered; known kinds: {sorted(TASK_KINDS)}")
    return TASK_KINDS[name]


@register_task("classification")
class ClassificationTask:
    objective = "classification"

    def load(self, task: Any) -> tuple[list[Example], list[Example]]:
        return (
            read_classification(task.train, task.text_key, task.label_key),
            read_classification(task.eval, task.eval_text_key or task.text_key, task.eval_label_key or task.label_key),
        )


@register_task("sft")
class SftTask:
    objective = "sft"

    def load(self, task: Any) -> tuple[list[Example], list[Example]]:
        return (
            read_sft(task.train, task.prompt_key, task.response_key),
            read_sft(task.eval, task.prompt_key, task.response_key),
        )
