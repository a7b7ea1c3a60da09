"""`data.sources`: several sources, each prepped in its own language and counted, sharded and evaluated on its own.

Layout (the one-source `data.inputs` layout is unchanged):

    prep/sources/<name>/    input/ removed/ work/ logs/ of that source's prep run
    prep/output/<name>@<rank>.jsonl.zst   its clean documents (the tokenizer reads them all)
    prep/stats.json         the totals, and "sources": {name: the same counts for that source}
    shards/train|val/<name>-<task>-<n>.arrow   each manifest entry says its "source";
    shards/manifest.json    "sources": {name: {train|val: {docs, tokens, bytes}}}

Deduplication runs within each source: a source's counts then say what that source
alone lost, and sources in different languages share next to nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataprep.config import DataConfig, PrepConfig, ShardsConfig, SourceConfig
from dataprep.shards import ShardError

OUTPUT_SEPARATOR = "@"  # not allowed in a source name, so <name>@ never prefixes another source's files


def output_prefix(name: str) -> str:
    return f"{name}{OUTPUT_SEPARATOR}"


def output_glob(name: str) -> str:
    return f"{output_prefix(name)}*.jsonl*"


def source_root(prep_root: Path, name: str) -> Path:
    return Path(prep_root) / "sources" / name


def source_configs(data: DataConfig, prep: PrepConfig, source: SourceConfig) -> tuple[DataConfig, PrepConfig]:
    """The data and prep settings this source is prepped with: its files and keys, its language (the rest of
    data, e.g. data.txt and data.strict, holds for every source)."""
    own_data = data.model_copy(update={"inputs": list(source.inputs), "text_key": source.text_key or data.text_key,
                                       "id_key": source.id_key or data.id_key, "sources": []})
    own_prep = prep.model_copy(update={"language": source.language or prep.language})
    return own_data, own_prep


def total_counts(per_source: dict[str, dict[str, int]]) -> dict[str, int]:
    """The counts of all sources added up (a step one source lacks counts 0 there)."""
    total: dict[str, int] = {}
    for counts in per_source.values():
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total


def source_metrics(per_source: dict[str, dict[str, Any]]) -> dict[str, float]:
    """source.<name>.<count> for MLflow."""
    return {f"source.{name}.{key}": float(value) for name, counts in per_source.items()
            for key, value in counts.items() if isinstance(value, int | float)}


def kept_documents(counts: dict[str, int]) -> dict[str, int]:
    """The counts under the names the summary uses for a source."""
    return {"docs_in": counts["docs_in"], "docs_kept": counts["docs_out"], "bytes_in": counts["bytes_in"],
            "bytes_kept": counts["bytes_out"]}


# ---- shards ----------------------------------------------------------------------------------------------------


def shard_substages(sources: list[SourceConfig], clean: Path, writer_args: dict[str, Any],
                    shards: ShardsConfig) -> list[Any]:
    """One tokenizing sub-stage per source: its clean documents -> its own train and val shards."""
    from datatrove.pipeline.readers import JsonlReader

    from dataprep.prep import SubStage
    from dataprep.shard_step import TokenShardWriter

    stages = []
    for source in sources:
        files = len(list(Path(clean).glob(output_glob(source.name))))
        tasks = max(1, min(shards.tasks, files))
        steps = [JsonlReader(str(clean), glob_pattern=output_glob(source.name), recursive=False),
                 TokenShardWriter(source=source.name, split="hash", data_source=source.name, **writer_args)]
        stages.append(SubStage(f"source-{source.name}", steps, tasks, min(shards.workers, tasks)))
    return stages


def fill_splits(sources: list[SourceConfig], shards_dir: Path, tokenizer_dir: Path, shards: ShardsConfig) -> str:
    """Both splits of every source non-empty (dataprep.split_fix, source by source); how each was cut."""
    from dataprep.split_fix import ensure_both_splits

    notes = {s.name: ensure_both_splits(shards_dir, tokenizer_dir, shards.val_fraction, shards.max_shard_bytes,
                                        shards.compression, data_source=s.name) for s in sources}
    if len(set(notes.values())) == 1:
        return next(iter(notes.values()))
    return "; ".join(f"{name}: {note}" for name, note in notes.items())


def check_source_splits(manifest: dict[str, Any], sources: list[SourceConfig], val_fraction: float) -> None:
    """Every source has train tokens and val documents, or the stage says which one does not."""
    found = manifest.get("sources", {})
    for source in sources:
        splits = found.get(source.name)
        if splits is None or splits["train"]["tokens"] == 0:
            raise ShardError(f"source {source.name!r} has no train documents (its val split took "
                             f"{(splits or {}).get('val', {}).get('docs', 0)}): lower shards.val_fraction "
                             f"({val_fraction}) or give it more data")
        if splits["val"]["docs"] == 0:
            raise ShardError(f"the val split of source {source.name!r} is empty: raise shards.val_fraction "
                             f"({val_fraction}) or give it more data, or training cannot evaluate it")


def shard_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """source.<name>.<split>_<docs|tokens|bytes> for MLflow."""
    return {f"source.{name}.{split}_{key}": float(value) for name, splits in manifest.get("sources", {}).items()
            for split, counts in splits.items() for key, value in counts.items()}


# ---- identity --------------------------------------------------------------------------------------------------


def mix_weights(data: DataConfig) -> dict[str, float]:
    """{source name: weight} of data.sources (empty for data.inputs): what pretraining's order depends on."""
    return {s.name: s.weight for s in data.sources}
