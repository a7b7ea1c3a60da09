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


def resolve_inputs(cfg: Config, input_dir: Path) -> list[str]:
    """Input files: globs expanded, `builtin:` inputs materialised as jsonl under prep/input/."""
    from dataprep.builtin_corpus import materialise

    where = str(cfg.source or "<defaults>")
    files = []
    for path in expand_inputs(cfg.data.inputs, "data.inputs", where):
        if path.startswith(BUILTIN_PREFIX):
            try:
                path = str(materialise(path[len(BUILTIN_PREFIX):], input_dir, cfg.data.text_key, cfg.data.id_key))
            except ValueError as exc:
                raise ConfigError(f"{where}: `data.inputs`: {exc}") from None
        files.append(path)
    return files


# Config keys that tune each drop step, named in the warnings.
TUNING_KEYS = {
    "malformed": "data.text_key / data.id_key (and the input files)",
    "html_extraction": "the WARC inputs (HTML that yields no main text)",
    "length": "prep.filters.length.min_chars / max_chars",
    "language": "prep.filters.language.languages / threshold",
    "gopher_repetition": "prep.filters.gopher_repetition.* (or false)",
    "gopher_quality": "prep.filters.gopher_quality.* (or false)",
    "c4_quality": "prep.filters.c4_quality.* (or false)",
    "fineweb_quality": "prep.filters.fineweb_quality.* (or false)",
    "exact_dedup": "prep.dedup.exact",
    "minhash_dedup": "prep.dedup.minhash.*",
}
KEEP_WARN = 0.2  # keeping under this share of documents or bytes earns a warning
STEP_WARN = 0.5  # one step dropping over this share of what reached it earns a warning


class EmptyOutcome(ConfigError):
    """A data stage that kept nothing: what dropped the documents, and where they are."""


def sample_reason(removed: Path, step: str) -> str:
    """The reason recorded with the first document that `step` set aside."""
    import zstandard

    for path in sorted((removed / step).glob("*.jsonl.zst")):
        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
            first = io.TextIOWrapper(reader, encoding="utf-8", errors="replace").readline()
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            continue
        meta = record.get("metadata") or {}
        return str(meta.get("reason") or meta.get("filter_reason") or "")
    return ""


def check_outcome(ctx: StageContext, counts: dict[str, int], removed: Path) -> None:
    """Fail on an empty result; warn on a suspicious one (few documents kept, one step dropping most)."""
    dropped = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_") and v}
    if counts["docs_out"] == 0:
        by_reason = ", ".join(f"{step} {n}" for step, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
        top = max(dropped, key=dropped.get) if dropped else ""
        reason = sample_reason(removed, top) if top else ""
        example = f"; e.g. {top}: {reason}" if reason else ""
        raise EmptyOutcome(
            f"no document was kept: {counts['docs_in']} in, dropped by {by_reason or 'nothing (no input)'}"
            f"{example} (the dropped documents are in {removed})",
            hint=f"loosen {TUNING_KEYS.get(top, 'the filters')}" if top else "check data.inputs")
    docs_share = counts["docs_out"] / max(counts["docs_in"], 1)
    bytes_share = counts["bytes_out"] / max(counts["bytes_in"], 1)
    if min(docs_share, bytes_share) < KEEP_WARN:
        ctx.warn(f"prep kept only {docs_share:.0%} of the documents and {bytes_share:.0%} of the bytes")
    reaching = counts["docs_in"]
    for step, n in dropped.items():  # in the order the steps ran (the counts are built in that order)
        if reaching and n / reaching > STEP_WARN:
            ctx.warn(f"{step} dropped {n} of the {reaching} documents that reached it ({n / reaching:.0%}); "
                     f"it is tuned by {TUNING_KEYS.get(step, 'its prep keys')}")
        reaching -= n


def input_files(cfg: Config) -> list[str]:
    """The input files the stage will read (globs expanded; `builtin:` names as they are): its identity."""
    return expand_inputs(cfg.data.inputs, "data.inputs", str(cfg.source or "<defaults>"))


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

    dropped = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")}
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
        "output": str(plan.layout.output),
    }
