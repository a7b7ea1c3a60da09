"""Shared set-up for the training tests: a small workdir with a real tokenizer and real token shards.

Built through the real tokenizer and shard stages from Tiny Shakespeare (../shared/data), cut into
documents of a few hundred lines. Holds no tests itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import Config, load_config, parse_override

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"

# A model small enough that a DeepSpeed step takes milliseconds on one core.
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.micro_batch_size=4", "train.grad_accum=1", "train.lr=0.003", "train.min_lr=0.0003",
    "train.warmup_steps=2", "train.max_steps=8", "train.eval_every=4", "train.eval_batches=2",
    "train.checkpoint_every=4", "train.log_every=1", "train.precision=fp32", "train.sample_tokens=8",
    "train.sample_prompt='ROMEO:'",
]


def write_prep_output(workdir: Path, max_bytes: int = 200_000, lines_per_doc: int = 40) -> None:
    """Documents of `lines_per_doc` lines from the start of Tiny Shakespeare, in the prep stage's output layout."""
    import zstandard

    lines = SHAKESPEARE.read_text(encoding="utf-8")[:max_bytes].splitlines(keepends=True)
    docs = ["".join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    out = workdir / "prep" / "output"
    out.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"text": t, "id": f"shakespeare/{i}", "metadata": {}}) + "\n" for i, t in enumerate(docs))
    (out / "00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode("utf-8")))


# The data settings build_workdir shards with: a config that trains on its shards must say the same, or the
# shard stage is out of date for it.
TINY_DATA = ["tokenizer.vocab_size=300", "shards.val_fraction=0.15", "shards.tasks=1", "shards.workers=1"]


def tiny_config(workdir: Path, *overrides: str) -> Config:
    return load_config(None, [f"workdir={workdir}", *TINY_DATA, *TINY, *overrides])


def build_workdir(workdir: Path) -> Config:
    """A workdir with prep output, a trained tokenizer and token shards (the pretrain stage's inputs)."""
    from pipeline.core.runner import run_stage

    cfg = tiny_config(workdir)
    write_prep_output(workdir)
    run_stage(cfg, "tokenizer")
    run_stage(cfg, "shard")
    return cfg


def copy_inputs(base: Path, workdir: Path) -> None:
    """A fresh workdir holding `base`'s tokenizer and shards, so each test trains from scratch."""
    import shutil

    for name in ("tokenizer", "shards"):
        shutil.copytree(base / name, workdir / name)


def copy_workdir(workdir: Path, tmp_path: Path) -> Path:
    """A copy of a trained workdir, for a test that changes its checkpoints."""
    import shutil

    shutil.copytree(workdir, tmp_path / "w")
    return tmp_path / "w"


def write_yaml(path: Path, overrides: list[str]) -> Path:
    """A config file holding exactly these `key.path=value` settings, as a user would write it."""
    import yaml

    tree: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(tree))
    return path


def torchrun_cli(*args: str) -> list[str]:
    """`torchrun` with 2 processes on `scratchgpt ARGS`. `--standalone` binds the rendezvous store to a free port
    itself: a port picked by the test and released could be taken by the other test worker before torchrun binds it."""
    import sys

    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli",
            *args]


def cli_env() -> dict[str, str]:
    """This environment without rank variables or an MLflow URI, so a command uses its own workdir's store.

    (mlflow.set_tracking_uri in a fixture exports MLFLOW_TRACKING_URI.)
    """
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "MLFLOW_TRACKING_URI")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1"}
