"""`scratchgpt shard`: tokenize the clean documents into Arrow token shards and write manifest.json.

A datatrove pipeline (JsonlReader -> TokenShardWriter) runs `shards.tasks` tasks;
each writes its own shards and a part file, and this module merges the parts
into `<workdir>/shards/manifest.json`. With `data.val_inputs`, the clean
documents all go to train and a second pipeline tokenizes the val inputs as
they are into val.

Bookkeeping (datatrove logs and per-task completions, so an interrupted run
resumes) lives in `<workdir>/shard/`; the shards in `<workdir>/shards/`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, expand_inputs
from pipeline.stage_tokenizer import PREP_GLOB, prep_output
from pipeline.stages import stage_dir, stage_hash


def shards_dir(cfg: Config) -> Path:
    return Path(cfg.workdir) / "shards"


def tokenizer_dir(cfg: Config) -> Path:
    folder = stage_dir(cfg, "tokenizer")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder}: run `scratchgpt tokenizer CONFIG` first")
    return folder


def make_local_executor(pipeline: list[Any], tasks: int, workers: int, logging_dir: Path) -> Any:
    """datatrove's local executor: `tasks` tasks, `workers` at once, resumable through `logging_dir`."""
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                 logging_dir=str(logging_dir))


def make_executor(cfg: Config, pipeline: list[Any], tasks: int, workers: int, logging_dir: Path, name: str) -> Any:
    if cfg.executor != "local":
        raise NotImplementedError(f"executor {cfg.executor!r} is not wired into the shard stage yet; "
                                  f"use executor: local")
    return make_local_executor(pipeline, tasks, workers, logging_dir)


def _start_fresh_if_config_changed(cfg: Config, logs: Path, out: Path, token_hash: str) -> None:
    """Resume an interrupted run with the same config; anything else starts from an empty folder.

    datatrove skips tasks it has completion files for, so files from a run with
    another config or tokenizer must not survive into this one.
    """
    identity = {"stage_hash": stage_hash(cfg, "shard"), "tokenizer_sha256": token_hash}
    stamp = logs / "run_identity.json"
    try:
        previous = json.loads(stamp.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        previous = None
    if previous != identity:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(identity))


def merge_parts(out: Path, token_hash: str) -> dict[str, Any]:
    """manifest.json from every task's part file; errors name a part that does not belong."""
    from dataprep.shard_step import read_parts
    from dataprep.shards import build_manifest, write_manifest

    parts = read_parts(out)
    if not parts:
        raise RuntimeError(f"no task wrote a part file in {out / '_parts'}")
    entries: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    metadata = parts[0]["metadata"]
    for part in parts:
        if part["metadata"]["tokenizer_sha256"] != token_hash:
            raise RuntimeError(f"{out}/_parts: task {part['source']}-{part['rank']} used another tokenizer")
        for split, shards in part["shards"].items():
            for entry in shards:
                if not (out / entry["path"]).is_file():
                    raise RuntimeError(f"task {part['source']}-{part['rank']} listed {entry['path']}, "
                                       f"which is missing from {out}")
            entries[split].extend(shards)
    manifest = build_manifest(metadata, entries)
    write_manifest(out, manifest)
    return manifest


def run_shard(cfg: Config) -> dict[str, Any]:
    import mlflow
    from datatrove.pipeline.readers import JsonlReader

    from dataprep.shard_step import FileDocumentsReader, TokenShardWriter
    from dataprep.shards import manifest_sha256
    from dataprep.tokenizer import tokenizer_sha256
    from pipeline.tracking import stage_run

    sc = cfg.shards
    clean = prep_output(cfg)
    tok_dir = tokenizer_dir(cfg)
    token_hash = tokenizer_sha256(tok_dir)
    out = shards_dir(cfg)
    logs = stage_dir(cfg, "shard") / "logs"
    val_files = expand_inputs(cfg.data.val_inputs, "data.val_inputs", str(cfg.source or "<defaults>"))

    with stage_run(cfg, "shard", sections=("data", "shards"), tags={"tokenizer_sha256": token_hash}):
        started = time.time()
        _start_fresh_if_config_changed(cfg, logs, out, token_hash)
        writer_args = {"tokenizer_dir": tok_dir, "shards_dir": out, "val_fraction": sc.val_fraction,
                       "max_shard_bytes": sc.max_shard_bytes, "compression": sc.compression}
        main = [
            JsonlReader(str(clean), glob_pattern=PREP_GLOB, recursive=False),
            TokenShardWriter(source="docs", split="train" if val_files else "hash", **writer_args),
        ]
        make_executor(cfg, main, sc.tasks, sc.workers, logs / "docs", "shard-docs").run()
        if val_files:
            reader = FileDocumentsReader(val_files, text_key=cfg.data.text_key, id_key=cfg.data.id_key)
            val = [reader, TokenShardWriter(source="valinputs", split="val", **writer_args)]
            tasks = min(sc.tasks, len(val_files))
            make_executor(cfg, val, tasks, sc.workers, logs / "val_inputs", "shard-val").run()
        manifest = merge_parts(out, token_hash)
        seconds = time.time() - started
        splits = manifest["splits"]
        summary: dict[str, Any] = {}
        for split in ("train", "val"):
            summary[f"{split}_docs"] = splits[split]["docs"]
            summary[f"{split}_tokens"] = splits[split]["tokens"]
            summary[f"{split}_bytes"] = splits[split]["bytes"]
            summary[f"{split}_shards"] = len(splits[split]["shards"])
        total_bytes = summary["train_bytes"] + summary["val_bytes"]
        summary["mb_per_sec"] = total_bytes / 2**20 / seconds
        summary["tokens_per_sec"] = (summary["train_tokens"] + summary["val_tokens"]) / seconds
        summary["seconds"] = seconds
        summary["dtype"] = manifest["dtype"]
        summary["manifest_sha256"] = manifest_sha256(out)
        summary["path"] = str(out)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
        mlflow.set_tags({"manifest_sha256": summary["manifest_sha256"], "dtype": manifest["dtype"]})
        mlflow.log_artifact(str(out / "manifest.json"))
    if summary["val_docs"] == 0:
        print(f"[shard] warning: the val split is empty; raise shards.val_fraction ({sc.val_fraction}) "
              f"or set data.val_inputs, or training cannot evaluate")
    return summary
