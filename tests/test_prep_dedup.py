"""Dedup on real pages with planted exact and near duplicates: the copies go, the originals stay."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from data_helpers import WEB, read_zst_jsonl

from pipeline.config import load_config
from pipeline.core.runner import run_stage

FILTERS_OFF = {k: False for k in ("length", "language", "gopher_repetition", "gopher_quality", "c4_quality",
                                  "fineweb_quality", "pii")}


def change_words(text: str, n: int, seed: int) -> str:
    """A near-duplicate: n words replaced, as an edited or re-syndicated copy would differ."""
    words = text.split(" ")
    rng = random.Random(seed)
    for i in rng.sample(range(len(words)), n):
        words[i] = "edited"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """40 real CleanEval pages (originals first), then 3 exact copies and 3 copies with 5 words changed."""
    tmp = tmp_path_factory.mktemp("planted")
    pages = [json.loads(line) for line in (WEB / "cleaneval_dev.jsonl").open()]
    pages = [{"id": p["id"], "text": p["gold_text"]} for p in pages if len(p["gold_text"].split()) > 300][:40]
    exact = [{"id": f"exact-copy-of-{p['id']}", "text": p["text"]} for p in pages[:3]]
    near = [{"id": f"near-copy-of-{p['id']}", "text": change_words(p["text"], 5, i)} for i, p in enumerate(pages[3:6])]
    path = tmp / "pages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pages + exact + near))
    return {"path": path, "pages": pages, "exact": exact, "near": near, "tmp": tmp}


@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch) -> None:
    """mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI; keep each run in its own workdir's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run(planted: dict, name: str, dedup: dict) -> tuple[dict, Path]:
    workdir = planted["tmp"] / name
    cfg_path = planted["tmp"] / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "workdir": str(workdir),
        "data": {"inputs": [str(planted["path"])]},
        "prep": {"tasks": 1, "workers": 1, "filters": FILTERS_OFF, "dedup": dedup},
    }))
    cfg = load_config(cfg_path)
    return run_stage(cfg, "prep", force=True), workdir / "prep"


def test_exact_and_minhash_remove_planted_copies_and_keep_originals(planted: dict) -> None:
    summary, prep = run(planted, "both", {"exact": True, "minhash": True})
    out_ids = {r["id"] for r in read_zst_jsonl(prep / "output")}
    exact_removed = {r["id"] for r in read_zst_jsonl(prep / "removed" / "exact_dedup")}
    near_removed = {r["id"] for r in read_zst_jsonl(prep / "removed" / "minhash_dedup")}
    assert exact_removed == {r["id"] for r in planted["exact"]}
    assert {r["id"] for r in planted["near"]} <= near_removed
    assert {p["id"] for p in planted["pages"][:6]} <= out_ids  # the originals of every planted copy
    assert summary["dropped"]["exact_dedup"] == 3
    assert summary["dropped"]["minhash_dedup"] == len(near_removed)
    assert summary["docs_in"] == 46 == summary["docs_out"] + sum(summary["dropped"].values())
    reasons = {r["metadata"]["reason"] for r in read_zst_jsonl(prep / "removed" / "minhash_dedup")}
    assert reasons == {"near-duplicate of a kept document (MinHash)"}


def test_exact_only_leaves_near_copies(planted: dict) -> None:
    summary, prep = run(planted, "exact", {"exact": True, "minhash": False})
    out_ids = {r["id"] for r in read_zst_jsonl(prep / "output")}
    assert {r["id"] for r in planted["near"]} <= out_ids
    assert summary["dropped"]["exact_dedup"] == 3 and "minhash_dedup" not in summary["dropped"]


def test_minhash_alone_also_catches_exact_copies(planted: dict) -> None:
    summary, prep = run(planted, "minhash", {"exact": False, "minhash": {"ngram": 5, "buckets": 14,
                                                                         "hashes_per_bucket": 8}})
    removed = {r["id"] for r in read_zst_jsonl(prep / "removed" / "minhash_dedup")}
    planted_ids = {r["id"] for r in planted["exact"] + planted["near"]}
    assert planted_ids <= removed
    assert {p["id"] for p in planted["pages"][:6]} <= {r["id"] for r in read_zst_jsonl(prep / "output")}
    assert "exact_dedup" not in summary["dropped"]
