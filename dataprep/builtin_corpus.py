"""`builtin:python-docs`: the documentation that ships with every Python, as a demo corpus.

Two kinds of real, human-written English: the reference-manual topics in
`pydoc_data.topics` (what `help("if")` prints) and the docstrings of the
standard library's public modules, classes and functions (longer than 200
characters). About 2 MB on CPython 3.11. Objects re-exported under several
modules (`collections.namedtuple` as `functools.namedtuple`, ...) give real
exact duplicates, and sibling docstrings (`str.replace` / `bytes.replace`)
real near-duplicates, so dedup has genuine work to do.

The corpus is built in a fresh interpreter (`python -m dataprep.builtin_corpus OUT`)
so that importing ~500 modules neither runs in nor depends on the calling
process; for a given Python version the file is the same byte for byte.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

NAME = "python-docs"
MIN_DOC_CHARS = 200
# Importing these has side effects (opens a browser, prints, needs a display) or they are test suites.
SKIP_MODULES = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "__main__", "lib2to3", "test",
                "ensurepip", "venv", "pydoc_data"}
SKIP_PARTS = {"test", "tests", "idle_test"}


def _quiet_import(name: str):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(name)


def stdlib_modules() -> list[str]:
    """Public stdlib modules and their public submodules that import on this platform, sorted."""
    found: set[str] = set()
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP_MODULES or name.startswith("_"):
            continue
        try:
            module = _quiet_import(name)
        except Exception:  # platform-specific modules (winreg, msvcrt, ...) are simply absent
            continue
        found.add(name)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
            parts = info.name.split(".")[1:]
            if any(p.startswith("_") or p in SKIP_PARTS for p in parts):
                continue
            try:
                _quiet_import(info.name)
            except Exception:
                continue
            found.add(info.name)
    return sorted(found)


def _doc(obj: object) -> str | None:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc)
    return doc if len(doc) > MIN_DOC_CHARS else None


def docstrings(module_name: str) -> Iterator[tuple[str, str, str]]:
    """(qualified name, kind, docstring) for a module, its public classes, their methods, and its public functions.

    kind is what the docstring documents: module, class or function (methods included).
    """
    module = sys.modules[module_name]
    if doc := _doc(module):
        yield module_name, "module", doc
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if inspect.isclass(obj):
            if doc := _doc(obj):
                yield f"{module_name}.{name}", "class", doc
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                if callable(member) or isinstance(member, (property, staticmethod, classmethod)):
                    if doc := _doc(member):
                        yield f"{module_name}.{name}.{member_name}", "function", doc
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            if doc := _doc(obj):
                yield f"{module_name}.{name}", "function", doc


def documents() -> Iterator[dict[str, str]]:
    """Every document of the corpus, in a fixed order: topics first, then docstrings by module."""
    import pydoc_data.topics

    for topic, text in sorted(pydoc_data.topics.topics.items()):
        yield {"id": f"{NAME}:topic:{topic}", "text": text.strip(), "source": "pydoc_data.topics", "kind": "topic"}
    for module_name in stdlib_modules():
        for qualname, kind, text in docstrings(module_name):
            yield {"id": f"{NAME}:doc:{qualname}", "text": text, "source": "docstring", "kind": kind}


def write_corpus(out: Path, text_key: str = "text", id_key: str = "id") -> int:
    """Write the corpus as JSON lines (atomically); returns the number of documents."""
    warnings.simplefilter("ignore")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for doc in documents():
            row = {id_key: doc["id"], text_key: doc["text"], "source": doc["source"], "kind": doc["kind"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n


def materialise(name: str, folder: Path, text_key: str = "text", id_key: str = "id") -> Path:
    """The jsonl file for `builtin:<name>` under `folder`, built once in a fresh interpreter."""
    if name != NAME:
        raise ValueError(f"unknown built-in input builtin:{name} (available: builtin:{NAME})")
    out = Path(folder) / f"{NAME}.jsonl"
    if out.is_file():
        return out
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dataprep.builtin_corpus", str(out), text_key, id_key]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"building builtin:{NAME} failed:\n{result.stderr[-2000:]}")
    return out


KIND_TASK = "python-docs-kind"
KIND_LABELS = ("module", "class", "function")


def write_kind_task(corpus: Path, out_dir: Path, eval_fraction: float = 0.15, text_key: str = "text",
                    id_key: str = "id") -> dict[str, Path]:
    """A built-in classification task: which kind of object (module, class, function) a docstring documents.

    Real text with real labels, from the corpus file. Each distinct text appears once (re-exported copies
    would otherwise land on both sides of the split), and a hash of the id decides train or eval, so the
    split is the same on every run. Writes `train.tsv` and `eval.tsv` (columns label, text).
    """
    import hashlib

    seen: set[str] = set()
    rows: dict[str, list[str]] = {"train": [], "eval": []}
    with Path(corpus).open(encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc.get("kind") not in KIND_LABELS or doc[text_key] in seen:
                continue
            seen.add(doc[text_key])
            bucket = int.from_bytes(hashlib.sha256(doc[id_key].encode()).digest()[:8], "big") / 2**64
            text = " ".join(doc[text_key].split())  # one line per example in a TSV
            rows["eval" if bucket < eval_fraction else "train"].append(f"{doc['kind']}\t{text}\n")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, lines in rows.items():
        paths[split] = out_dir / f"{split}.tsv"
        paths[split].write_text("label\ttext\n" + "".join(lines), encoding="utf-8")
    return paths


if __name__ == "__main__":
    count = write_corpus(Path(sys.argv[1]), *sys.argv[2:4])
    print(f"{count} documents")
