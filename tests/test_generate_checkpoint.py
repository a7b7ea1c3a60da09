"""`scratchgpt generate` from a real ZeRO-3 checkpoint gives what it gives from the export of that checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import TINY, TINY_DATA, build_workdir

from pipeline.config import parse_override

VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # builds shards and pretrains a tiny model under DeepSpeed first (~30 s)


def scratchgpt(*args: str) -> subprocess.CompletedProcess:
    # A clean environment: no rank variables or tracking URI left over from other tests in this process.
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([str(VENV_BIN / "scratchgpt"), *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workdir after `scratchgpt pretrain` of the tiny model (4 steps, ZeRO-3, one process, checkpoints at 2 and
    4)."""
    workdir = tmp_path_factory.mktemp("gen_ckpt") / "work"
    build_workdir(workdir)
    tree: dict = {"workdir": str(workdir), "tokenizer": {"vocab_size": 300}, "tracking": {"experiment": "g"}}
    for text in [*TINY_DATA, *TINY, "train.max_steps=4", "train.eval_every=4", "train.checkpoint_every=2"]:
        keys, value = parse_override(text)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    config = workdir.parent / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = scratchgpt("pretrain", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_checkpoint_and_export_generate_the_same_text(trained):
    common = ["--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3", "--top-k", "20"]
    from_ckpt = scratchgpt("generate", "--model", str(trained / "pretrain" / "checkpoints"), *common)
    from_export = scratchgpt("generate", "--model", str(trained / "pretrain" / "export"), *common)
    from_workdir = scratchgpt("generate", "--model", str(trained), *common)
    assert from_ckpt.returncode == 0, from_ckpt.stderr[-2000:]
    assert from_ckpt.stdout.startswith("ROMEO:") and len(from_ckpt.stdout) > len("ROMEO:\n")
    assert from_ckpt.stdout == from_export.stdout == from_workdir.stdout


def test_a_damaged_checkpoint_is_reported_without_traceback(trained, tmp_path):
    import shutil

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(trained / "pretrain" / "checkpoints", ckpts)
    tag = (ckpts / "latest").read_text().strip()
    for f in (ckpts / tag).glob("*model_states.pt"):
        f.unlink()
    result = scratchgpt("generate", "--model", str(ckpts), "--prompt", "a", "--tokenizer", str(trained / "tokenizer"))
    assert result.returncode == 2
    assert "model_states" in result.stderr and "Traceback" not in result.stderr


def test_one_step_folder_generates_what_its_export_does(trained, tmp_path):
    ckpts = trained / "pretrain" / "checkpoints"
    oldest = sorted(p for p in ckpts.glob("step_*") if p.is_dir())[0]  # not `latest`: the tag must be honoured
    assert oldest.name != (ckpts / "latest").read_text().strip()
    out = tmp_path / "export"
    for _ in range(2):  # the second writes over the first: an earlier export may be replaced
        done = scratchgpt("export", str(oldest), "--out", str(out))
        assert done.returncode == 0, done.stderr[-2000:]
    common = ["--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3", "--top-k", "20"]
    from_step = scratchgpt("generate", "--model", str(oldest), *common)
    from_export = scratchgpt("generate", "--model", str(out), "--tokenizer", str(trained / "tokenizer"), *common)
    from_latest = scratchgpt("generate", "--model", str(ckpts), *common)
    assert from_step.returncode == 0, from_step.stderr[-2000:]
    assert from_step.stdout == from_export.stdout != from_latest.stdout


def test_a_relative_model_path_from_inside_the_checkpoints_finds_the_workdir(trained, monkeypatch):
    from pipeline.commands.generate import resolve_model

    ckpts = trained / "pretrain" / "checkpoints"
    oldest = sorted(p for p in ckpts.glob("step_*") if p.is_dir())[0]
    monkeypatch.chdir(oldest)
    assert resolve_model(Path(".")) == ("checkpoint", ckpts.resolve(), oldest.name)
    monkeypatch.chdir(ckpts)
    assert resolve_model(Path(".")) == ("checkpoint", ckpts.resolve(), None)
