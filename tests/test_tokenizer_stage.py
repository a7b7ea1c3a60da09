"""What the tokenizer stage trains on: a uniform sample of the asked size, pieces held back for bytes/token."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_shards_fixtures import web_documents, write_prep_output

from pipeline.config import load_config
from pipeline.core.runner import run_stage
from pipeline.stages.tokenizer import TrainingSample


@pytest.fixture(autouse=True)
def own_mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own store: mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which would
    otherwise carry one test's store into the next (the stages honour the variable)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_sample_bytes_trains_on_about_that_much_and_never_on_held_back_text(tmp_path: Path) -> None:
    docs = web_documents()  # about 5 MB
    folder = write_prep_output(tmp_path, docs, files=2)
    sample = TrainingSample(folder, heldout_fraction=0.05, sample_bytes=1_000_000)
    pieces = list(sample)
    assert 800_000 < sample.train_bytes < 1_200_000
    assert sample.train_bytes == sum(len(p.encode()) for p in pieces)
    assert 100_000 < sum(len(p) for p in sample.heldout) < 500_000
    assert not set(pieces) & set(sample.heldout)
    sources = {i for i, d in enumerate(docs) if any(p in d["text"] for p in pieces[::50])}
    assert max(sources) - min(sources) > len(docs) // 2  # spread over the corpus, not its first files
    again = TrainingSample(folder, heldout_fraction=0.05, sample_bytes=1_000_000)
    assert list(again) == pieces  # the same sample on every run


def test_without_held_back_text_bytes_per_token_says_it_was_measured_on_training_text(tmp_path: Path) -> None:
    write_prep_output(tmp_path, web_documents()[:20], files=1)
    cfg = load_config(None, [f"workdir={tmp_path}", "data.inputs=[]", "tokenizer.vocab_size=300",
                             "tokenizer.heldout_fraction=0"])
    summary = run_stage(cfg, "tokenizer")
    assert summary["bytes_per_token_on"] == "train"
    assert summary["vocab_size"] == 300 and summary["bytes_per_token"] > 1
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
