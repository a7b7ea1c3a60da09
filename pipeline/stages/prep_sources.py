"""The prep stage for `data.sources`: the prep pipeline once per source, each with its own language settings.

Each source's run has its own folders under prep/sources/<name>/ (so its counts, drops
and resume state stay its own) and writes its clean documents to prep/output/ as
<name>@<rank>.jsonl.zst; see dataprep.sources for the layout.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pipeline.core.runner import StageContext
from pipeline.stages.prep import EmptyOutcome, PrepInputError, check_outcome, dropped_by_step, resolve_inputs


def run_sources(ctx: StageContext) -> dict[str, Any]:
    import mlflow

    from dataprep.prep import build_plan, check_invariant, collect_counts, outcome_warnings
    from dataprep.readers import MalformedRecordError
    from dataprep.sources import (
        kept_documents,
        output_prefix,
        source_configs,
        source_metrics,
        source_root,
        total_counts,
    )
    from pipeline.core.executors import run_local, run_slurm

    cfg = ctx.cfg
    started = time.perf_counter()
    where = cfg.source or "<defaults>"
    plans, inputs = {}, {}
    for i, source in enumerate(cfg.data.sources):
        data, prep = source_configs(cfg.data, cfg.prep, source)
        root = source_root(ctx.paths.prep, source.name)
        key = f"data.sources.{i}.inputs"
        inputs[source.name] = resolve_inputs(cfg, root / "input", source.inputs, key, data.text_key, data.id_key)
        try:
            plans[source.name] = build_plan(inputs[source.name], data, prep, root, ctx.paths.prep_output,
                                            output_prefix(source.name))
        except ValueError as exc:
            raise PrepInputError(f"{where}: `{key}`: {exc}") from None

    seconds: dict[str, float] = {}
    per_source: dict[str, dict[str, int]] = {}
    for name, plan in plans.items():
        try:
            if cfg.executor == "slurm":
                took = run_slurm(cfg, plan.stages, plan.layout.logs, label=f"prep-{name}")
            else:
                took = run_local(plan.stages, plan.layout.logs, label=f"prep-{name}")
        except MalformedRecordError as exc:
            raise PrepInputError(f"malformed input in source {name!r} (data.strict is on): {exc}") from None
        seconds.update({f"{name}/{k}": round(v, 2) for k, v in took.items()})
        per_source[name] = collect_counts(plan)
        check_invariant(per_source[name])
    counts = total_counts(per_source)
    elapsed = time.perf_counter() - started
    stats = {**counts, "seconds": round(elapsed, 2), "seconds_by_substage": seconds,
             "inputs": [f for files in inputs.values() for f in files], "sources": per_source,
             "mlflow_run_id": ctx.run.info.run_id if ctx.run else None}
    ctx.paths.prep_stats.write_text(json.dumps(stats, indent=2))
    mlflow.log_metrics({k: float(v) for k, v in counts.items()})
    mlflow.log_metrics(source_metrics({n: {**c, **kept_documents(c)} for n, c in per_source.items()}))
    mlflow.log_metric("seconds", elapsed)
    mlflow.log_artifact(str(ctx.paths.prep_stats))

    for name, plan in plans.items():
        if per_source[name]["docs_out"] == 0:
            try:
                check_outcome(ctx, per_source[name], plan.layout.removed)
            except EmptyOutcome as exc:
                raise EmptyOutcome(f"source {name!r}: {exc}", hint=exc.hint) from None
        for line in outcome_warnings(per_source[name]):
            ctx.warn(f"source {name}: {line.removeprefix('prep: ')}")

    print(f"[prep] {counts['docs_in']} docs ({counts['bytes_in'] / 1e6:.1f} MB) in, {counts['docs_out']} out "
          f"({counts['bytes_out'] / 1e6:.1f} MB) from {len(plans)} sources, "
          f"{counts['docs_in'] / max(elapsed, 1e-9):.0f} docs/s", file=sys.stderr)
    return {
        "docs_in": counts["docs_in"],
        "docs_out": counts["docs_out"],
        "bytes_in": counts["bytes_in"],
        "bytes_out": counts["bytes_out"],
        "sources": {name: {**kept_documents(c),
                           "dropped": dropped_by_step(c)}
                    for name, c in per_source.items()},
        "output": str(ctx.paths.prep_output),
    }
