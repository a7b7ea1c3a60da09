"""`scratchgpt prep` end to end: outputs, the stats invariant, MLflow, skip, resume, and errors before work."""

from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from data_helpers import WEB, read_zst_jsonl

from dataprep.builtin_corpus import materialise
from pipeline.cli import main
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def prose(n: int, lines: int = 40) -> list[str]:
    """`n` documents of real text that the default filters keep: speeches of Tiny Shakespeare."""
    text = SHAKESPEARE.read_text(encoding="utf-8").splitlines(keepends=True)
    return ["".join(text[i * lines:(i + 1) * lines]) for i in range(n)]


def write_config(tmp: Path, workdir: Path, inputs: list[str], **prep) -> Path:
    path = tmp / "prep.yaml"
    path.write_text(yaml.safe_dump({
        "workdir": str(workdir),
        "data": {"inputs": inputs},
        "prep": {"tasks": 2, "workers": 1, **prep},
        "tracking": {"experiment": "prep-test"},
    }))
    return path


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> list[str]:
    """Shared web data in four formats plus small files built here, two of them bad."""
    tmp = tmp_path_factory.mktemp("inputs")
    pages = [json.loads(line) for line in (WEB / "cleanportaleval.jsonl").open()][:20]
    pq.write_table(pa.table({"id": [p["id"] + "#pq" for p in pages[:5]], "text": [p["text"] for p in pages[:5]]}),
                   tmp / "five.parquet")
    (tmp / "note.txt").write_text(pages[5]["gold_text"])
    bad = b"".join(json.dumps({"id": p["id"] + "#bad", "text": p["gold_text"]}).encode() + b"\n" for p in pages[6:9])
    (tmp / "bad.jsonl.gz").write_bytes(gzip.compress(bad + b'{"id": "x", "text": "cut\n' + b'{"body": 1}\n'))
    (tmp / "empty.jsonl").write_bytes(b"")
    return [str(WEB / "cleaneval_dev.jsonl"), str(WEB / "c4" / "*.json.gz"), str(WEB / "warc" / "sample-0000.warc.gz"),
            str(tmp / "five.parquet"), str(tmp / "note.txt"), str(tmp / "*.jsonl*")]


@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch) -> None:
    """mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI, which would send this test's runs to an
    earlier test's store; each run here must use its own workdir's sqlite file."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mixed_inputs) -> dict:
    tmp = tmp_path_factory.mktemp("run")
    workdir = tmp / "work"
    cfg_path = write_config(tmp, workdir, mixed_inputs)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # see own_mlflow_store
        assert main(["prep", str(cfg_path)]) == 0
    return {"cfg": cfg_path, "workdir": workdir, "prep": workdir / "prep",
            "stats": json.loads((workdir / "prep" / "stats.json").read_text())}


def test_outputs_and_stats_invariant(finished: dict) -> None:
    prep, stats = finished["prep"], finished["stats"]
    out = read_zst_jsonl(prep / "output")
    assert {"text", "id", "metadata"} <= set(out[0])
    assert stats["docs_out"] == len(out) > 20
    assert stats["bytes_out"] == sum(len(r["text"].encode()) for r in out)
    dropped = {k: v for k, v in stats.items() if k.startswith("dropped_")}
    assert stats["docs_in"] == stats["docs_out"] + sum(dropped.values())
    for key, count in dropped.items():  # each count is backed by one record per document
        records = read_zst_jsonl(prep / "removed" / key.removeprefix("dropped_"))
        assert len(records) == count, key
        assert all(r["id"] and r["metadata"]["reason"] for r in records)
    # the bad inputs: 1 malformed line, 1 record without text, the empty file
    malformed = read_zst_jsonl(prep / "removed" / "malformed")
    assert sorted(r["metadata"]["reason"].split(":")[0] for r in malformed) == [
        "empty file", "malformed JSON", "no text key 'text' (keys"]
    assert stats["dropped_malformed"] == 3
    ids = [r["id"] for r in out]
    assert len(ids) == len(set(ids))
    assert any(i.startswith("<urn:uuid:") for i in ids)  # WARC pages extracted to text
    assert not any("<html" in r["text"].lower() for r in out)
    assert any(i.endswith("#pq") for i in ids) and any(i.endswith("note.txt:1") for i in ids)


def test_mlflow_run_has_counts_and_stats_artifact(finished: dict) -> None:
    db = finished["workdir"] / "mlflow.db"
    assert db.is_file()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("prep-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'prep'")
    stats = finished["stats"]
    for key in ("docs_in", "docs_out", "bytes_in", "bytes_out", "dropped_exact_dedup", "dropped_malformed",
                "bytes_dropped_length", "bytes_edited_c4_quality"):
        assert run.data.metrics[key] == stats[key]
    assert run.data.params["prep.dedup.minhash.buckets"] == "14"
    assert "stats.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.info.status == "FINISHED"
    with sqlite3.connect(db) as con:  # the store is a real sqlite file
        assert con.execute("select count(*) from runs").fetchone()[0] >= 1


def test_rerun_with_marker_skips(finished: dict, capsys) -> None:
    out_files = sorted((finished["prep"] / "output").glob("*"))
    mtimes = [p.stat().st_mtime_ns for p in out_files]
    assert main(["prep", str(finished["cfg"])]) == 0
    assert "complete, skipped" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in out_files] == mtimes


def test_interrupted_run_resumes_from_task_completions(finished: dict, capsys) -> None:
    prep = finished["prep"]
    # what a run killed during the last sub-stage leaves: its start record and no marker, task 1 neither
    # completed nor written
    (prep / "_COMPLETE.json").rename(prep / "_STARTED.json")
    last = sorted((prep / "logs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    assert last.name == "minhash_filter"
    (last / "completions" / "00001").unlink()
    (prep / "output" / "00001.jsonl.zst").unlink()
    kept = prep / "output" / "00000.jsonl.zst"
    kept_mtime = kept.stat().st_mtime_ns
    filter_completions = sorted(p.stat().st_mtime_ns for p in (prep / "logs" / "filter" / "completions").iterdir())

    assert main(["prep", str(finished["cfg"])]) == 0
    err = capsys.readouterr().err
    assert "minhash_filter: 2 tasks on 1 workers, resuming: 1 already done" in err
    assert "filter: already complete" in err
    assert (prep / "output" / "00001.jsonl.zst").is_file()
    assert kept.stat().st_mtime_ns == kept_mtime  # task 0 was not redone
    assert sorted(p.stat().st_mtime_ns for p in (prep / "logs" / "filter" / "completions").iterdir()) == \
        filter_completions
    again = json.loads((prep / "stats.json").read_text())
    assert {k: v for k, v in again.items() if not k.startswith(("seconds", "mlflow"))} == \
        {k: v for k, v in finished["stats"].items() if not k.startswith(("seconds", "mlflow"))}


def test_force_redoes_from_scratch(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"id": f"{i}", "text": t}) + "\n" for i, t in enumerate(prose(4))))
    cfg = write_config(tmp_path, tmp_path / "w", [str(src)], filters={"language": False}, tasks=1)
    assert main(["prep", str(cfg)]) == 0
    first = json.loads((tmp_path / "w" / "prep" / "stats.json").read_text())
    src.write_text(src.read_text() + json.dumps({"id": "new", "text": prose(5)[4]}) + "\n")
    assert main(["prep", str(cfg), "--force"]) == 0  # same config, new data: stale completions must not count
    second = json.loads((tmp_path / "w" / "prep" / "stats.json").read_text())
    assert second["docs_in"] == first["docs_in"] + 1


def test_strict_mode_stops_with_file_and_line(tmp_path: Path, capsys) -> None:
    src = tmp_path / "s.jsonl"
    src.write_text('{"id": "1", "text": "fine"}\n{"id": "2", "text": broken}\n')
    cfg = write_config(tmp_path, tmp_path / "w", [str(src)], tasks=1)
    assert main(["prep", str(cfg), "data.strict=true"]) == 2
    assert f"{src}:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "w" / "prep" / "_COMPLETE.json").exists()


def test_unwritable_workdir_fails_before_work(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = write_config(tmp_path, blocker / "work", [str(WEB / "cleaneval_dev.jsonl")])
    assert main(["prep", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cannot write the prep output folder" in err and str(blocker / "work" / "prep") in err
    assert blocker.read_text() == "not a folder"


def test_glob_matching_nothing_and_unknown_key_fail_before_work(tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path, tmp_path / "w", [str(tmp_path / "nothing-*.jsonl")])
    assert main(["prep", str(cfg)]) == 2
    assert "nothing-*.jsonl' matches no file" in capsys.readouterr().err
    cfg = write_config(tmp_path, tmp_path / "w", [str(WEB / "cleaneval_dev.jsonl")])
    assert main(["prep", str(cfg), "prep.filters.nope=1"]) == 2
    assert "unknown key `prep.filters.nope`" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_unknown_input_format_fails_before_work(tmp_path: Path, capsys) -> None:
    (tmp_path / "table.csv").write_text("text\nhello\n")
    cfg = write_config(tmp_path, tmp_path / "w", [str(tmp_path / "table.csv")])
    assert main(["prep", str(cfg)]) == 2
    assert "table.csv: unknown input format" in capsys.readouterr().err


def test_builtin_corpus_is_real_deterministic_and_has_duplicates(tmp_path: Path) -> None:
    a = materialise("python-docs", tmp_path / "a")
    b = materialise("python-docs", tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.open()]
    assert 1_000_000 < sum(len(r["text"].encode()) for r in rows) < 4_000_000
    assert {r["source"] for r in rows} == {"pydoc_data.topics", "docstring"}
    texts = [r["text"] for r in rows]
    assert len(texts) - len(set(texts)) > 100  # re-exported objects: real exact duplicates
    assert len({r["id"] for r in rows}) == len(rows)
    assert any(r["id"] == "python-docs:topic:if" for r in rows)
    with pytest.raises(ValueError, match="unknown built-in"):
        materialise("nope", tmp_path)


def test_default_config_is_valid() -> None:
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.data.inputs == ["builtin:python-docs"]
    assert cfg.prep.filters.c4_quality is False and cfg.prep.dedup.exact is True
