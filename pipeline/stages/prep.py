"""The `prep` stage: raw inputs -> clean, deduplicated documents in <workdir>/prep/output/.

Imported only when the stage runs; datatrove and mlflow load inside functions.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import BUILTIN_PREFIX, Config, ConfigError, expand_inputs
from pipeline.core.runner import StageContext
from pipeline.core.workdir import workdir_of


class PrepInputError(ConfigError):
    """Input that stops the stage (strict mode, unknown format): reported like a config error, file and line."""


def resolve_inputs(cfg: Config, input_dir: Path, patterns: list[str] | None = None, key: str = "data.inputs",
                   text_key: str | None = None, id_key: str | None = None) -> list[str]:
    """Input files: globs expanded, `builtin:` inputs materialised as jsonl under prep/input/.
    (`patterns` and the keys: one source of data.sources; default data.inputs.)"""
    from dataprep.builtin_corpus import materialise

    where = str(cfg.source or "<defaults>")
    text_key, id_key = text_key or cfg.data.text_key, id_key or cfg.data.id_key
    files = []
    for path in expand_inputs(cfg.data.inputs if patterns is None else patterns, key, where):
        if path.startswith(BUILTIN_PREFIX):
            try:
                path = str(materialise(path[len(BUILTIN_PREFIX):], input_dir, text_key, id_key))
            except ValueError as exc:
                raise ConfigError(f"{where}: `{key}`: {exc}") from None
        files.append(path)
    return files


class EmptyOutcome(ConfigError):
    """A data stage that kept nothing: what dropped the documents, and where they are."""


def removed_metadata(removed: Path, step: str, limit: int = 1) -> list[dict[str, Any]]:
    """The metadata of the first `limit` documents that `step` set aside (file, line, reason, ...)."""
    import zstandard

    found: list[dict[str, Any]] = []
    for path in sorted((removed / step).glob("*.jsonl.zst")):
        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
            for line in io.TextIOWrapper(reader, encoding="utf-8", errors="replace"):
                try:
                    found.append(json.loads(line).get("metadata") or {})
                except (json.JSONDecodeError, AttributeError):
                    continue
                if len(found) >= limit:
                    return found
    return found


def sample_reason(removed: Path, step: str) -> str:
    """The reason recorded with the first document that `step` set aside."""
    for meta in removed_metadata(removed, step):
        return str(meta.get("reason") or meta.get("filter_reason") or "")
    return ""


def malformed_warning(count: int, removed: Path) -> str:
    """Records that could not be read are never a silent loss: how many, which files and why, where they are."""
    examples = removed_metadata(removed, "malformed", limit=3)
    shown = "; ".join(f"{Path(str(m.get('file', '?'))).name}:{m.get('line', '?')}: {m.get('reason', '')}"
                      for m in examples)
    hint = (" (a file in another encoding: convert it to UTF-8 first, e.g. `iconv -f GB18030 -t UTF-8`)"
            if any("UTF-8" in str(m.get("reason", "")) for m in examples) else "")
    return (f"{count} malformed record{'s' if count != 1 else ''} set aside, e.g. {shown}{hint}; "
            f"they are in {removed / 'malformed'}")


def dropped_by_step(counts: dict[str, Any]) -> dict[str, Any]:
    """{step: documents dropped} from prep counts (`dropped_<step>` keys)."""
    return {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")}


def check_outcome(ctx: StageContext, counts: dict[str, int], removed: Path) -> None:
    """Fail on an empty result; warn on a suspicious one (few documents kept, one step dropping most)."""
    from dataprep.prep import tuning_keys

    dropped = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_") and v}
    if counts["docs_out"] == 0:
        by_reason = ", ".join(f"{step} {n}" for step, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
        top = max(dropped, key=dropped.get) if dropped else ""
        reason = sample_reason(removed, top) if top else ""
        example = f"; e.g. {top}: {reason}" if reason else ""
        raise EmptyOutcome(
            f"no document was kept: {counts['docs_in']} in, dropped by {by_reason or 'nothing (no input)'}"
            f"{example} (the dropped documents are in {removed})",
            hint=f"loosen {tuning_keys(top)}" if top else "check data.inputs")
    from dataprep.prep import outcome_warnings

    if counts.get("dropped_malformed"):
        ctx.warn(malformed_warning(counts["dropped_malformed"], removed))
    for line in outcome_warnings(counts):
        ctx.warn(line.removeprefix("prep: "))


def input_groups(cfg: Config) -> list[tuple[str, list[str]]]:
    """(config key, its files) for each source, or for `data.inputs`; globs expanded, `builtin:` names as they are."""
    where = str(cfg.source or "<defaults>")
    groups = ([(f"data.sources.{i}.inputs", s.inputs) for i, s in enumerate(cfg.data.sources)]
              or [("data.inputs", cfg.data.inputs)])
    return [(key, expand_inputs(patterns, key, where)) for key, patterns in groups]


def input_files(cfg: Config) -> list[str]:
    """The input files the stage will read: its identity."""
    return [path for _, files in input_groups(cfg) for path in files]


def check(cfg: Config, resumed: bool) -> None:
    """Every input has a format prep reads (a glob that caught a README.md), and every `data.val_inputs` file one
    the shard stage tokenizes: refused before an earlier run's outputs are removed."""
    from dataprep.readers import input_format

    for key, files in input_groups(cfg):
        for path in files:
            if not path.startswith(BUILTIN_PREFIX):
                try:
                    input_format(path)
                except ValueError as exc:
                    raise PrepInputError(f"{cfg.source or '<defaults>'}: `{key}`: {exc}") from None
    from pipeline.stages.shard import val_input_files

    val_input_files(cfg)  # data.val_inputs is prep's section too: a change reruns prep, then shard would refuse


def verify(cfg: Config, marker: dict[str, Any]) -> str:
    """The clean documents are still the ones prep wrote (names, sizes and counts)."""
    if marker.get("digest") and digest(cfg) != marker["digest"]:
        return f"its outputs in {workdir_of(cfg).prep_output} changed since it finished"
    return ""


def digest(cfg: Config) -> str:
    """What prep produced: its counts and its output files (name, size)."""
    paths = workdir_of(cfg)
    stats = json.loads(paths.prep_stats.read_text())
    counts = {k: v for k, v in stats.items() if k.startswith(("docs_", "bytes_", "dropped_"))}
    files = sorted((p.name, p.stat().st_size) for p in paths.prep_output.glob("*"))
    return hashlib.sha256(json.dumps([counts, files], sort_keys=True).encode()).hexdigest()[:16]


def run(ctx: StageContext) -> dict[str, Any]:
    """Run the prep sub-stages, write prep/stats.json, log counts to MLflow; returns the summary."""
    from dataprep.prep import build_plan, check_invariant, collect_counts
    from dataprep.readers import MalformedRecordError
    from pipeline.core.executors import run_local, run_slurm

    cfg = ctx.cfg
    if cfg.data.sources:  # several sources: the same pipeline once per source
        from pipeline.stages.prep_sources import run_sources

        return run_sources(ctx)
    started = time.perf_counter()
    root = ctx.paths.prep
    files = resolve_inputs(cfg, ctx.paths.prep_input)
    try:
        plan = build_plan(files, cfg.data, cfg.prep, root)
    except ValueError as exc:
        raise PrepInputError(f"{cfg.source or '<defaults>'}: `data.inputs`: {exc}") from None

    import mlflow

    try:
        if cfg.executor == "slurm":
            seconds = run_slurm(cfg, plan.stages, plan.layout.logs)
        else:
            seconds = run_local(plan.stages, plan.layout.logs)
    except MalformedRecordError as exc:
        raise PrepInputError(f"malformed input (data.strict is on): {exc}") from None
    counts = collect_counts(plan)
    check_invariant(counts)
    elapsed = time.perf_counter() - started
    stats = {**counts, "seconds": round(elapsed, 2),
             "seconds_by_substage": {k: round(v, 2) for k, v in seconds.items()},
             "inputs": files, "mlflow_run_id": ctx.run.info.run_id if ctx.run else None}
    plan.layout.stats.write_text(json.dumps(stats, indent=2))
    mlflow.log_metrics({k: float(v) for k, v in counts.items()})
    mlflow.log_metric("seconds", elapsed)
    mlflow.log_artifact(str(plan.layout.stats))
    check_outcome(ctx, counts, plan.layout.removed)

    dropped = dropped_by_step(counts)
    mb = counts["bytes_in"] / 1e6
    print(f"[prep] {counts['docs_in']} docs ({mb:.1f} MB) in, {counts['docs_out']} out "
          f"({counts['bytes_out'] / 1e6:.1f} MB), {counts['docs_in'] / max(elapsed, 1e-9):.0f} docs/s, "
          f"{mb / max(elapsed, 1e-9):.2f} MB/s", file=sys.stderr)
    return {
        "docs_in": counts["docs_in"],
        "docs_out": counts["docs_out"],
        "bytes_in": counts["bytes_in"],
        "bytes_out": counts["bytes_out"],
        "dropped": dropped,
        "bytes_removed": {step: v + counts.get(f"bytes_edited_{step}", 0) for k, v in counts.items()
                          if (step := k.removeprefix("bytes_dropped_")) != k},
        "bytes_edited": {k.removeprefix("bytes_edited_"): v for k, v in counts.items()
                         if k.startswith("bytes_edited_")},
        "output": str(plan.layout.output),
    }
