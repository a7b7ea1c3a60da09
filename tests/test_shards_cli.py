"""`scratchgpt tokenizer` and `scratchgpt shard` end to end on prepared clean documents: files, manifest, MLflow."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from test_shards_fixtures import SHARED, web_documents, write_prep_output

from dataprep.shard_step import split_of
from dataprep.shards import file_sha256, open_shard, read_manifest
from dataprep.tokenizer import eot_id, load_tokenizer, tokenizer_sha256
from pipeline.cli import main
from training.data import PackedLoader


@pytest.fixture(autouse=True)
def own_mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own store: mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which would
    otherwise carry one test's store into the next (the stages honour the variable)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def write_config(workdir: Path, extra: str = "") -> Path:
    path = workdir / "cfg.yaml"
    path.write_text(f"workdir: {workdir}\ndata:\n  inputs: []\n{extra}"
                    "tokenizer:\n  vocab_size: 512\n"
                    "shards:\n  val_fraction: 0.1\n  max_shard_bytes: 40000\n  tasks: 2\n  workers: 2\n")
    return path


def mlflow_metrics(workdir: Path, stage: str) -> dict[str, float]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scratchgpt")
    runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", order_by=["start_time DESC"])
    assert runs, f"no MLflow run for {stage}"
    return runs[0].data.metrics


def shard_texts(workdir: Path, split: str) -> list[str]:
    """Every document of a split decoded back to text (end-of-text dropped)."""
    tok = load_tokenizer(workdir / "tokenizer")
    eot = eot_id(tok)
    manifest = read_manifest(workdir / "shards")
    out = []
    for entry in manifest["splits"][split]["shards"]:
        for doc in open_shard(workdir / "shards" / entry["path"]).documents():
            assert doc[-1] == eot and eot not in doc[:-1]
            out.append(tok.decode(doc[:-1].tolist(), skip_special_tokens=False))
    return out


def test_tokenizer_and_shard_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = web_documents()[:120] + web_documents()[-7:]  # about 600 KB, with the Chinese/emoji/code strings
    write_prep_output(tmp_path, docs, files=3)
    cfg = write_config(tmp_path)

    assert main(["tokenizer", str(cfg)]) == 0
    tok_dir = tmp_path / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        assert (tok_dir / name).is_file()
    metrics = mlflow_metrics(tmp_path, "tokenizer")
    assert metrics["vocab_size"] == 512 == load_tokenizer(tok_dir).get_vocab_size()
    assert 1.5 < metrics["bytes_per_token"] < 6

    assert main(["shard", str(cfg)]) == 0
    out = tmp_path / "shards"
    manifest = read_manifest(out)
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(tok_dir)
    assert manifest["vocab_size"] == 512 and manifest["dtype"] == "uint16"
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            assert file_sha256(out / entry["path"]) == entry["sha256"]
    expected = {s: Counter(d["text"] for d in docs if split_of(d["id"], 0.1) == s) for s in ("train", "val")}
    assert expected["val"] and len(manifest["splits"]["train"]["shards"]) > 2
    for split in ("train", "val"):
        assert Counter(shard_texts(tmp_path, split)) == expected[split]  # exact text round trip, right split
        assert manifest["splits"][split]["bytes"] == sum(len(t.encode()) * n for t, n in expected[split].items())
    metrics = mlflow_metrics(tmp_path, "shard")
    for key in ("train_tokens", "val_tokens", "train_docs", "val_docs"):
        split, what = key.split("_")
        assert metrics[key] == manifest["splits"][split][what]

    loader = PackedLoader(out, "train", 64, 4, tokenizer_sha256=tokenizer_sha256(tok_dir), vocab_size=512,
                          verify_checksums=True)
    x, _ = loader.next_batch()
    assert x.max() < 512

    capsys.readouterr()
    assert main(["shard", str(cfg)]) == 0
    assert "complete, skipped" in capsys.readouterr().out

    # Interrupted while task 1 ran: its files are gone, a start record and no marker. The rerun redoes task 1.
    (tmp_path / "shard" / "_COMPLETE.json").rename(tmp_path / "shard" / "_STARTED.json")
    (tmp_path / "shard" / "logs" / "docs" / "completions" / "00001").unlink()
    (out / "_parts" / "docs-00001.json").unlink()
    for path in out.glob("*/docs-00001-*.arrow"):
        path.unlink()
    task0 = {p: p.stat().st_mtime_ns for p in out.glob("*/docs-00000-*.arrow")}
    assert main(["shard", str(cfg)]) == 0
    assert "resuming: 1 already done" in capsys.readouterr().err
    assert read_manifest(out) == manifest
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/docs-00000-*.arrow")} == task0  # task 0 not redone

    # Another task count: the same documents in the same splits, and no files left from the first run.
    assert main(["shard", str(cfg), "shards.tasks=1", "shards.workers=1"]) == 0
    again = read_manifest(out)
    for split in ("train", "val"):
        assert Counter(shard_texts(tmp_path, split)) == expected[split]
        assert again["splits"][split]["tokens"] == manifest["splits"][split]["tokens"]
    listed = {e["path"] for s in again["splits"].values() for e in s["shards"]}
    assert {str(p.relative_to(out)) for p in out.glob("*/*.arrow")} == listed
    assert all("-00000-" in p for p in listed)


def test_val_inputs_are_the_val_split_as_they_are(tmp_path: Path) -> None:
    docs = web_documents()[:60]
    write_prep_output(tmp_path, docs, files=2)
    play = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    tail = tmp_path / "val_tail.txt"
    tail.write_text(play[-len(play) // 10 :], encoding="utf-8")
    extra = tmp_path / "val_extra.jsonl.zst"
    lines = '{"text": "first val doc 😀", "id": "v1"}\n{"broken json\n{"text": "third 中文", "id": "v3"}\n'
    extra.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    cfg = write_config(tmp_path, f"  val_inputs: [{tail}, {extra}]\n")

    assert main(["tokenizer", str(cfg)]) == 0
    assert main(["shard", str(cfg)]) == 0
    assert Counter(shard_texts(tmp_path, "val")) == Counter([tail.read_text(), "first val doc 😀", "third 中文"])
    assert Counter(shard_texts(tmp_path, "train")) == Counter(d["text"] for d in docs)  # every clean doc trains
    summary = json.loads((tmp_path / "shard" / "_COMPLETE.json").read_text())["summary"]
    assert summary["val_inputs_malformed"] == 1
    removed = list((tmp_path / "shard" / "removed").rglob("*.jsonl.zst"))
    assert removed and b"malformed JSON" in zstandard.ZstdDecompressor().stream_reader(removed[0].open("rb")).read()


def test_shard_without_a_tokenizer_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_prep_output(tmp_path, web_documents()[:3], files=1)
    assert main(["shard", str(write_config(tmp_path))]) == 2
    assert "run `scratchgpt tokenizer" in capsys.readouterr().err


def test_tokenizer_without_prep_output_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenizer", str(write_config(tmp_path))]) == 2
    assert "run `scratchgpt prep" in capsys.readouterr().err
