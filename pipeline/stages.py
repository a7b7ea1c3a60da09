"""The stage graph: each stage's config sections, what it depends on, and its completion marker.

A finished stage writes `<workdir>/<stage>/_COMPLETE.json` holding a hash of the
config sections it consumed and of its upstream stages' hashes. Running again
skips a stage whose marker hash matches, and redoes it (and so everything
after it) when the hash changed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError

MARKER = "_COMPLETE.json"
STARTED = "_STARTED.json"  # the hash a stage was started with, so a run with another config starts clean


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections whose change redoes the stage
    upstream: tuple[str, ...]
    entry: str  # "module:function" taking the Config and returning the summary figures;
    # imported only when the stage runs, so `--help` does not pay for torch or datatrove.
    help: str = ""
    # Extra command-line switches: (flag, the override it stands for, help).
    flags: tuple[tuple[str, str, str], ...] = ()
    # Folders under the workdir that hold this stage's outputs (its own folder included).
    outputs: tuple[str, ...] = ()

    def run(self, cfg: Config) -> dict[str, Any]:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)(cfg)


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


def stage_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.workdir) / name


def stage_hash(cfg: Config, name: str) -> str:
    stage = STAGES[name]
    parts = [cfg.section_hash(*stage.sections)] + [stage_hash(cfg, up) for up in stage.upstream]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def resume_hash(cfg: Config, name: str) -> str:
    """The stage hash as far as it decides whether earlier outputs can be continued rather than cleared:
    a WSD pretraining's train.max_steps may change (training.schedule.resumable_train)."""
    from training.schedule import resumable_train

    return stage_hash(cfg.model_copy(update={"train": resumable_train(cfg.train)}), name)


def read_marker(cfg: Config, name: str) -> dict[str, Any] | None:
    path = stage_dir(cfg, name) / MARKER
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):  # workdir under a file: no marker
        return None


def is_complete(cfg: Config, name: str) -> bool:
    marker = read_marker(cfg, name)
    return marker is not None and marker.get("hash") == stage_hash(cfg, name)


def write_marker(cfg: Config, name: str, summary: dict[str, Any], started: float) -> None:
    path = stage_dir(cfg, name) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "stage": name,
        "hash": stage_hash(cfg, name),
        "resume_hash": resume_hash(cfg, name),
        "started": started,
        "finished": time.time(),
        "summary": summary,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str))
    os.replace(tmp, path)  # atomic: a marker is never half-written


def clear_marker(cfg: Config, name: str) -> None:
    (stage_dir(cfg, name) / MARKER).unlink(missing_ok=True)


def outputs_are_stale(cfg: Config, name: str, force: bool = False) -> bool:
    """True when the stage's folders hold work done with another config (or --force asks to redo it).

    An interrupted run with the same config is not stale: it resumes from what it left.
    """
    current = resume_hash(cfg, name)
    for path in (stage_dir(cfg, name) / MARKER, stage_dir(cfg, name) / STARTED):
        try:
            body = json.loads(path.read_text())
            if body.get("resume_hash", body.get("hash")) != current:
                return True
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            continue
    return force and any((Path(cfg.workdir) / out).exists() for out in STAGES[name].outputs)


def start_clean(cfg: Config, name: str, force: bool = False) -> None:
    """Remove stale outputs, then record the hash this stage starts with.

    Call it from one process only (the CLI for a single-process stage, `submit` before queueing a job):
    ranks of a multi-process stage must never see each other's deletions.
    """
    if outputs_are_stale(cfg, name, force):
        for out in STAGES[name].outputs:
            shutil.rmtree(Path(cfg.workdir) / out, ignore_errors=True)
    path = stage_dir(cfg, name) / STARTED
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"stage": name, "hash": stage_hash(cfg, name),
                                    "resume_hash": resume_hash(cfg, name), "at": time.time()}))
    except OSError as exc:
        raise ConfigError(f"cannot write the {name} output folder {path.parent}: {exc.strerror or exc}") from None


# The chain, in order. Later stages join as they are built.
register(Stage("prep", ("data", "prep"), (), "pipeline.stage_prep:run_prep",
               "deduplicate and quality-filter raw text into clean documents", outputs=("prep",)))
register(Stage("tokenizer", ("tokenizer",), ("prep",), "pipeline.stage_tokenizer:run_tokenizer",
               "train a byte-level BPE tokenizer on the clean documents", outputs=("tokenizer",)))
register(Stage("shard", ("data", "shards"), ("prep", "tokenizer"), "pipeline.stage_shard:run_shard",
               "tokenize clean documents into Arrow token shards", outputs=("shard", "shards")))
register(Stage("pretrain", ("model", "train"), ("shard",), "pipeline.stage_pretrain:run_pretrain",
               "pretrain the GPT with DeepSpeed ZeRO-3", outputs=("pretrain",)))
register(Stage("finetune", ("finetune",), ("pretrain",), "pipeline.stage_finetune:run_finetune",
               "fine-tune the pretrained model on each task in finetune.tasks",
               flags=(("--from-scratch", "finetune.from_scratch=true",
                       "train the same architecture from random weights (the no-pretraining baseline)"),)))
# finetune declares no outputs to clear: it never resumes, each task rewrites its own folder, and the
# --from-scratch baseline (finetune/<task>-scratch) must stay beside the pretrained run's results.
