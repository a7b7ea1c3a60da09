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

import time
from pathlib import Path
from typing import Any

from dataprep.prep import SubStage
from pipeline.config import BUILTIN_PREFIX, Config, ConfigError, expand_inputs
from pipeline.core.runner import StageContext
from pipeline.core.tracking import SHARD_MANIFEST_TAG, TOKENIZER_TAG
from pipeline.core.workdir import workdir_of
from pipeline.stages.tokenizer import PREP_GLOB, StageInputError, prep_output, tokenizer_output


def shards_dir(cfg: Config) -> Path:
    return workdir_of(cfg).shards


def input_files(cfg: Config) -> list[str]:
    """`data.val_inputs`, tokenized as they are: part of the stage's identity."""
    return expand_inputs(cfg.data.val_inputs, "data.val_inputs", str(cfg.source or "<defaults>"))


def digest(cfg: Config) -> str:
    from dataprep.shards import manifest_sha256

    return manifest_sha256(workdir_of(cfg).shards)


def verify(cfg: Config, marker: dict[str, Any]) -> str:
    """The manifest is the one this stage wrote and every shard it lists is there at its size (no hashing here:
    pretraining checks the shards' content as `shards.verify` says)."""
    from dataprep.shard_verify import listed_shard_problem
    from dataprep.shards import read_manifest

    shards = workdir_of(cfg).shards
    manifest = read_manifest(shards)
    if marker.get("digest") and digest(cfg) != marker["digest"]:
        return f"{shards / 'manifest.json'} changed since it finished"
    problems = (listed_shard_problem(shards, entry) for split in manifest["splits"].values()
                for entry in split.get("shards", []))
    return next((problem for problem in problems if problem), "")


def run_substages(cfg: Config, stages: list[SubStage], logs: Path) -> dict[str, float]:
    from pipeline.core.executors import run_local, run_slurm

    if cfg.executor == "slurm":
        return run_slurm(cfg, stages, logs, label="shard")
    return run_local(stages, logs, label="shard")


def val_input_files(cfg: Config) -> list[str]:
    """`data.val_inputs` as files; WARC is refused because its HTML needs the prep stage's extraction."""
    from dataprep.readers import input_format

    where = str(cfg.source or "<defaults>")
    files = expand_inputs(cfg.data.val_inputs, "data.val_inputs", where)
    for path in files:
        try:
            fmt = input_format(path)
        except ValueError as exc:
            raise ConfigError(f"{where}: `data.val_inputs`: {exc}") from None
        if fmt == "warc" or path.startswith(BUILTIN_PREFIX):
            raise ConfigError(f"{where}: `data.val_inputs`: {path} is tokenized as it is, so it must be text "
                              f"(.txt, .jsonl/.json[.gz|.zst], .parquet); put raw web data in data.inputs")
    return files


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
            if "data_source" in part:  # data.sources: the manifest says which source each shard holds
                shards = [{**entry, "source": part["data_source"]} for entry in shards]
            entries[split].extend(shards)
    manifest = build_manifest(metadata, entries)
    write_manifest(out, manifest)
    return manifest


def count_removed(removed: Path) -> int:
    """Records set aside (malformed val_inputs): one JSON line each in removed/<step>/<rank>.jsonl.zst."""
    import zstandard

    total = 0
    for path in removed.rglob("*.jsonl.zst"):
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        total += data.count(b"\n")
    return total


def run(ctx: StageContext) -> dict[str, Any]:
    import mlflow
    from datatrove.pipeline.readers import JsonlReader

    from dataprep.readers import InputReader, MalformedRecordError
    from dataprep.removed import RemovedWriter
    from dataprep.shard_step import TokenShardWriter
    from dataprep.shards import manifest_sha256
    from dataprep.tokenizer import tokenizer_sha256

    cfg = ctx.cfg
    sc = cfg.shards
    clean = prep_output(cfg)
    tok_dir = tokenizer_output(cfg)
    token_hash = tokenizer_sha256(tok_dir)
    out = shards_dir(cfg)
    logs = ctx.paths.shard_bookkeeping / "logs"
    removed = ctx.paths.shard_bookkeeping / "removed"  # malformed val_inputs records, each with its reason
    val_files = val_input_files(cfg)

    if ctx.run is not None:
        mlflow.set_tag(TOKENIZER_TAG, token_hash)
    started = time.time()
    logs.mkdir(parents=True, exist_ok=True)
    writer_args = {"tokenizer_dir": tok_dir, "shards_dir": out, "val_fraction": sc.val_fraction,
                   "max_shard_bytes": sc.max_shard_bytes, "compression": sc.compression}
    main = [
        JsonlReader(str(clean), glob_pattern=PREP_GLOB, recursive=False),
        TokenShardWriter(source="docs", split="train" if val_files else "hash", **writer_args),
    ]
    substages = [SubStage("docs", main, sc.tasks, min(sc.workers, sc.tasks))]
    if cfg.data.sources:  # each source its own train and val shards (dataprep.sources)
        from dataprep.sources import shard_substages

        substages = shard_substages(cfg.data.sources, clean, writer_args, sc)
    if val_files:
        reader = InputReader(val_files, text_key=cfg.data.text_key, id_key=cfg.data.id_key,
                             strict=cfg.data.strict, removed_writer=RemovedWriter(removed, "val_inputs"))
        tasks = min(sc.tasks, len(val_files))
        val = [reader, TokenShardWriter(source="valinputs", split="val", **writer_args)]
        substages.append(SubStage("val_inputs", val, tasks, min(sc.workers, tasks)))
    try:
        run_substages(cfg, substages, logs)
    except MalformedRecordError as exc:
        raise StageInputError(f"malformed record in data.val_inputs (data.strict is on): {exc}") from None
    split_note = "all clean documents in train; val from data.val_inputs"
    if cfg.data.sources:
        from dataprep.sources import fill_splits

        split_note = fill_splits(cfg.data.sources, out, tok_dir, sc)
    elif not val_files:  # both splits get documents whenever val_fraction > 0 (see dataprep.split_fix)
        from dataprep.split_fix import ensure_both_splits

        split_note = ensure_both_splits(out, tok_dir, sc.val_fraction, sc.max_shard_bytes, sc.compression)
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
    summary["val_inputs_malformed"] = count_removed(removed)
    summary["dtype"] = manifest["dtype"]
    summary["manifest_sha256"] = manifest_sha256(out)
    summary["path"] = str(out)
    summary["split"] = split_note
    mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
    if cfg.data.sources:
        from dataprep.sources import check_source_splits, shard_metrics

        summary["sources"] = manifest["sources"]
        mlflow.log_metrics(shard_metrics(manifest))
        check_source_splits(manifest, cfg.data.sources, sc.val_fraction)
    mlflow.set_tags({SHARD_MANIFEST_TAG: summary["manifest_sha256"], "dtype": manifest["dtype"]})
    mlflow.log_artifact(str(out / "manifest.json"))
    if summary["val_inputs_malformed"]:
        ctx.warn(f"{summary['val_inputs_malformed']} malformed records in data.val_inputs were set aside in "
                 f"{removed}, each with its reason")
    if summary["train_tokens"] == 0:
        raise ConfigError(f"the train split is empty ({summary['val_docs']} documents went to val): lower "
                          f"shards.val_fraction ({sc.val_fraction}) or add data")
    if summary["val_docs"] == 0:
        # Fail here, before the completion marker, rather than let pretraining find it out.
        raise ConfigError(f"the val split is empty: raise shards.val_fraction ({sc.val_fraction}) or set "
                          f"data.val_inputs, or training cannot evaluate")
    return summary
