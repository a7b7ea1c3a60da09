"""What a shared cluster needs: files that may hold credentials are private, names stay inside the workdir,
secrets stay out of MLflow and the terminal, and text input that is not UTF-8 is a one-line error."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.config import load_config


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "in.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    return tmp_path


def test_the_mlflow_store_and_the_slurm_snapshot_are_created_owner_only(inputs: Path) -> None:
    import os

    from pipeline.slurm_submit import prepare
    from pipeline.tracking import stage_run

    old = os.umask(0o022)  # the usual umask: files would be world-readable
    try:
        cfg = load_config(None, [f"workdir={inputs / 'w'}", "data.inputs=[in.jsonl]", "slurm.partition=debug"])
        with stage_run(cfg, "tokenizer", sections=("tokenizer",)):
            pass
        snapshot = prepare(cfg) / "config.yaml"
    finally:
        os.umask(old)
    assert mode_of(inputs / "w" / "mlflow.db") == 0o600
    assert (inputs / "w" / "mlflow.db").stat().st_size > 0  # MLflow made its tables in the file we created
    assert mode_of(snapshot) == 0o600
