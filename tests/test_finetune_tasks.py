"""Task files for fine-tuning: formats, labels, and the errors users meet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.config import TaskConfig
from training.task_metrics import accuracy, confusion_matrix, macro_f1
from training.tasks import LabelMap, TaskDataError, read_classification, task_kind, truncate

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


def test_reads_sst2_with_its_own_column_names() -> None:
    task = TaskConfig(name="sst2", train=str(SST2 / "train.tsv"), eval=str(SST2 / "dev.tsv"),
                      text_key="sentence", eval_text_key="content")
    train, dev = task_kind("classification")().load(task)
    assert len(train) == 67349 and len(dev) == 872
    assert train[0].text == "hide new secretions from the parental units"
    labels = LabelMap.from_examples(train)
    assert labels.labels == ["0", "1"]
    assert sum(labels.ids(dev, "dev")) == sum(1 for e in dev if e.label == "1")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_formats_give_the_same_examples(tmp_path: Path, suffix: str) -> None:
    rows = [{"review": "good, \"very\" good", "stars": 5}, {"review": "bad", "stars": 1}]
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        path.write_text('review,stars\n"good, ""very"" good",5\nbad,1\n')
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    examples = read_classification(path, "review", "stars")
    assert [e.text for e in examples] == ['good, "very" good', "bad"]
    assert LabelMap.from_examples(examples).labels == ["1", "5"]


def test_missing_label_column_names_file_line_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("label\ttext\n1\tfine\n")
    with pytest.raises(TaskDataError, match=r"t\.tsv:2: no label column 'sentiment'.*\['label', 'text'\]"):
        read_classification(path, "text", "sentiment")


def test_unseen_eval_label_is_named() -> None:
    labels = LabelMap(["neg", "pos"])
    from training.tasks import Example

    with pytest.raises(TaskDataError, match=r"dev\.tsv: label\(s\) \['neutral'\]"):
        labels.ids([Example("x", "pos"), Example("y", "neutral")], "dev.tsv")


def test_a_training_file_with_one_label_is_refused_not_scored_100_percent() -> None:
    """The first rows of a file sorted by label all share it: a one-class head would score every text right."""
    from training.objectives import objective
    from training.tasks import Example

    task = TaskConfig(name="t", train="head.tsv", eval="dev.tsv", label_key="stars")
    rows = [Example("good", "1"), Example("fine", "1")]
    with pytest.raises(TaskDataError, match=r"head\.tsv: every row's label column 'stars' holds '1'; .* at least two"):
        objective("classification").prepare(None, rows, rows, task, 16, 0)


def test_empty_and_malformed_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskDataError, match="no examples"):
        read_classification(empty, "text", "label")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", \n')
    with pytest.raises(TaskDataError, match=r"b\.jsonl:2: not valid JSON"):
        read_classification(bad, "text", "label")


def test_unregistered_task_kind_lists_known_ones() -> None:
    with pytest.raises(TaskDataError, match=r"'ner' is not registered.*classification.*sft"):
        task_kind("ner")


def test_truncation_keeps_the_configured_end() -> None:
    assert truncate([1, 2, 3, 4], 2, "left") == ([3, 4], True)
    assert truncate([1, 2, 3, 4], 2, "right") == ([1, 2], True)
    assert truncate([1, 2], 2, "left") == ([1, 2], False)


def test_scores() -> None:
    gold, pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert accuracy(gold, pred) == 0.6
    assert confusion_matrix(gold, pred, 3) == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # per-class F1: 0.5, 0.8, 0.0
    assert macro_f1(gold, pred, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_long_texts_are_truncated_on_the_configured_side_and_counted() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from training.objectives import encode_classification
    from training.tasks import Example

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "c": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    examples = [Example("a b c a b c", 0), Example("a b", 1)]
    left = encode_classification(tok, examples, [0, 1], block_size=4, side="left")
    right = encode_classification(tok, examples, [0, 1], block_size=4, side="right")
    assert left.truncated == right.truncated == 1
    assert left.ids == [[3, 1, 2, 3], [1, 2]]
    assert right.ids == [[1, 2, 3, 1], [1, 2]]


def test_builtin_kind_task_splits_by_id_and_keeps_each_text_once(tmp_path: Path) -> None:
    from dataprep.builtin_corpus import write_kind_task

    docs = [{"id": f"python-docs:doc:m{i}", "text": f"Return the thing number {i}.\n  Indented.", "kind": "function"}
            for i in range(200)]
    docs += [{"id": "python-docs:doc:copy", "text": docs[0]["text"], "kind": "function"},  # a re-export
             {"id": "python-docs:doc:mod", "text": "This module provides tools.", "kind": "module"},
             {"id": "python-docs:topic:if", "text": "The if statement", "kind": "topic"}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    files = write_kind_task(corpus, tmp_path / "task")
    train = read_classification(files["train"], "text", "label")
    dev = read_classification(files["eval"], "text", "label")
    assert len(train) + len(dev) == 201  # the copy and the topic are left out
    assert 0.05 < len(dev) / 201 < 0.3
    assert not {e.text for e in train} & {e.text for e in dev}
    assert "Return the thing number 0. Indented." in {e.text for e in train + dev}  # one line per example
    again = write_kind_task(corpus, tmp_path / "again")
    assert again["eval"].read_text() == files["eval"].read_text()


def test_unknown_builtin_task_file_is_named(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    task = '{name: t, train: "builtin:nope/train", eval: "builtin:python-docs-kind/eval"}'
    with pytest.raises(ConfigError, match=r"finetune\.tasks\.0\.train.*builtin:nope/train"):
        load_config(None, [f"finetune.tasks=[{task}]"])


def test_task_engine_settings_take_the_task_precision_else_pretraining_s() -> None:
    from training.config import TrainConfig
    from training.finetune import task_train_config

    base = TrainConfig(precision="bf16", max_minutes=5)
    task = TaskConfig(name="t", train="a.tsv", eval="b.tsv", lr=1e-3, max_steps=40)
    default = task_train_config(base, task)
    assert default.precision == "fp32" and default.lr == 1e-3 and default.max_steps == 40  # fp32 unless asked
    assert default.max_minutes is None  # a task is bounded by its steps, not pretraining's budget
    assert task_train_config(base, task.model_copy(update={"precision": None})).precision == "bf16"
    assert task_train_config(base, task.model_copy(update={"precision": "fp16"})).precision == "fp16"


def test_labels_are_stripped_so_padded_spellings_are_one_class(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("text\tlabel\ngreat\tpos\nawful\tneg \nfine\t pos\n")
    examples = read_classification(path, "text", "label")
    assert [e.label for e in examples] == ["pos", "neg", "pos"]
    assert LabelMap.from_examples(examples).labels == ["neg", "pos"]  # a 2-class head, not 4


@pytest.mark.parametrize(("name", "body", "line", "what"), [
    ("t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', 2, "null"),
    ("t.tsv", "text\tlabel\na\t1\nb\t\n", 3, "empty"),
    ("t.csv", "text,label\na,1\nb,  \n", 3, "empty"),
])
def test_a_missing_label_is_refused_naming_file_line_and_column(tmp_path: Path, name: str, body: str, line: int,
                                                                 what: str) -> None:
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(TaskDataError, match=rf"t\.{path.suffix[1:]}:{line}: the label column 'label' is {what}"):
        read_classification(path, "text", "label")


def test_a_parquet_null_label_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": "x"}, {"text": "b", "label": None}]), path)
    with pytest.raises(TaskDataError, match=r"t\.parquet:2: the label column 'label' is null"):
        read_classification(path, "text", "label")


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_a_row_with_fewer_fields_than_the_header_is_refused(tmp_path: Path, suffix: str) -> None:
    sep = "\t" if suffix == ".tsv" else ","
    path = tmp_path / f"t{suffix}"
    path.write_text(f"text{sep}label\ngood film{sep}pos\n{sep.join(['bad film', 'neg'])}\npos\n")
    with pytest.raises(TaskDataError, match=rf"t\{suffix}:4: fewer fields than the header has \(1 of 2\)"):
        read_classification(path, "text", "label")


def test_rows_with_empty_text_are_skipped_and_their_places_kept(tmp_path: Path) -> None:
    from training.tasks import Example, empty_skipped

    path = tmp_path / "t.tsv"
    path.write_text("text\tlabel\ngood\tpos\n\tneg\n   \tpos\nbad\tneg\n")
    examples = read_classification(path, "text", "label")
    assert [e.text for e in examples] == ["good", "bad"]
    assert empty_skipped(examples) == [f"{path}:3", f"{path}:4"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": null, "label": 1}\n{"text": "x", "label": 1}\n')
    assert empty_skipped(read_classification(jsonl, "text", "label")) == [f"{jsonl}:1"]
    assert empty_skipped([Example("from a registered kind", "pos")]) == []  # a plain list: nothing skipped
    only_empty = tmp_path / "e.tsv"
    only_empty.write_text("text\tlabel\n \tpos\n")
    with pytest.raises(TaskDataError, match=r"e\.tsv: every row's text column 'text' is empty"):
        read_classification(only_empty, "text", "label")


def test_a_null_sft_response_is_refused_not_trained_as_none(tmp_path: Path) -> None:
    from training.tasks import read_sft

    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q", "response": null}\n')
    with pytest.raises(TaskDataError, match=r"s\.jsonl:2: the response column 'response' is null"):
        read_sft(path, "prompt", "response")
