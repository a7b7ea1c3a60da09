"""The `prep` stage: raw inputs -> clean, deduplicated documents in <workdir>/prep/output/.

Imported only when the stage runs; datatrove and mlflow load inside functions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import BUILTIN_PREFIX, Config, ConfigError, expand_inputs
from pipeline.stages import MARKER, stage_dir


class PrepInputError(ConfigError):
    """Input that stops the stage (strict mode, unknown format): reported like a config error, file and line."""


def check_writable(folder: Path) -> None:
    """Fail before any work when the stage folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"`workdir`: cannot write the prep output folder {folder}: {exc.strerror or exc}") from None


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


def _plan_key(cfg: Config, files: list[str]) -> str:
    text = json.dumps({"config": cfg.section_hash("data", "prep"), "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_folder(cfg: Config, root: Path, key: str) -> None:
    """Keep datatrove's task completions only if they belong to this very config and input list.

    A stage marker here means a finished run that the CLI decided to redo (--force
    or a changed config): start from scratch. Completions from another config
    would make datatrove skip tasks with stale results: start from scratch too.
    """
    key_file = root / "logs" / "plan_key"
    stale = (root / MARKER).exists() or (key_file.exists() and key_file.read_text().strip() != key)
    if stale:
        for child in root.iterdir():
            if child.name != "input":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)


def run_prep(cfg: Config) -> dict[str, Any]:
    """Run the prep sub-stages, write prep/stats.json, log counts to MLflow; returns the summary."""
    from dataprep.prep import build_plan, check_invariant, collect_counts, outcome_warnings
    from dataprep.readers import MalformedRecordError
    from pipeline.executors import run_local, run_slurm
    from pipeline.tracking import stage_run

    started = time.perf_counter()
    root = stage_dir(cfg, "prep")
    check_writable(root)
    files = resolve_inputs(cfg, root / "input")
    try:
        plan = build_plan(files, cfg.data, cfg.prep, root)
    except ValueError as exc:
        raise PrepInputError(f"{cfg.source or '<defaults>'}: `data.inputs`: {exc}") from None
    prepare_folder(cfg, root, _plan_key(cfg, files))

    with stage_run(cfg, "prep", sections=("data", "prep")) as run:
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
                 "inputs": files, "mlflow_run_id": run.info.run_id}
        plan.layout.stats.write_text(json.dumps(stats, indent=2))
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        mlflow.log_metric("seconds", elapsed)
        mlflow.log_artifact(str(plan.layout.stats))

    dropped = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")}
    mb = counts["bytes_in"] / 1e6
    print(f"[prep] {counts['docs_in']} docs ({mb:.1f} MB) in, {counts['docs_out']} out "
          f"({counts['bytes_out'] / 1e6:.1f} MB), {counts['docs_in'] / max(elapsed, 1e-9):.0f} docs/s, "
          f"{mb / max(elapsed, 1e-9):.2f} MB/s", file=sys.stderr)
    for line in outcome_warnings(counts):  # the lead's stage runner may take these over
        print(f"[prep] warning: {line.removeprefix('prep: ')}", file=sys.stderr)
    return {
        "docs_in": counts["docs_in"],
        "docs_out": counts["docs_out"],
        "bytes_in": counts["bytes_in"],
        "bytes_out": counts["bytes_out"],
        "dropped": dropped,
        "bytes_removed": {step: v + counts[f"bytes_edited_{step}"] for k, v in counts.items()
                          if (step := k.removeprefix("bytes_dropped_")) != k},
        "bytes_edited": {k.removeprefix("bytes_edited_"): v for k, v in counts.items()
                         if k.startswith("bytes_edited_")},
        "warnings": outcome_warnings(counts),
        "output": str(plan.layout.output),
    }
