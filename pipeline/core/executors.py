"""Runs a data stage's datatrove sub-stages: locally (default) or as Slurm job arrays (`executor: slurm`).

Both executors keep datatrove's per-task completion files under each
sub-stage's logging folder, which is what lets an interrupted stage resume.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Config, ConfigError
from pipeline.core.console import console_to


class SubStageLike(Protocol):
    name: str
    pipeline: list[Any]
    tasks: int
    workers: int


def _incomplete(logging_dir: Path, tasks: int) -> int:
    done = {p.name for p in (logging_dir / "completions").glob("*")}
    return sum(1 for rank in range(tasks) if f"{rank:05d}" not in done)


def run_local(stages: list[SubStageLike], logs: Path, label: str = "prep") -> dict[str, float]:
    """Run the sub-stages one after another with datatrove's LocalPipelineExecutor; seconds per sub-stage."""
    from datatrove.executor import LocalPipelineExecutor

    seconds: dict[str, float] = {}
    for i, stage in enumerate(stages, start=1):
        logging_dir = logs / stage.name
        todo = _incomplete(logging_dir, stage.tasks)
        resumed = f", resuming: {stage.tasks - todo} already done" if 0 < todo < stage.tasks else ""
        status = "already complete" if todo == 0 else f"{stage.tasks} tasks on {stage.workers} workers{resumed}"
        print(f"[{label}] ({i}/{len(stages)}) {stage.name}: {status}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        executor = LocalPipelineExecutor(
            pipeline=stage.pipeline, tasks=stage.tasks, workers=stage.workers, logging_dir=str(logging_dir),
        )
        with console_to(logging_dir / "console.log"):
            executor.run()
        seconds[stage.name] = time.perf_counter() - started
    return seconds


def run_slurm(cfg: Config, stages: list[SubStageLike], logs: Path, label: str = "prep",
              poll_seconds: float = 10.0) -> dict[str, float]:
    """Submit the sub-stages as dependent Slurm job arrays, then wait for all of them to complete."""
    from datatrove.executor import SlurmPipelineExecutor

    if shutil.which("sbatch") is None:
        raise ConfigError("`executor: slurm`, but `sbatch` is not on PATH")
    if not cfg.slurm.partition:
        raise ConfigError("`executor: slurm` needs `slurm.partition` (datatrove writes it into every job)")
    s = cfg.slurm
    # Without it a failed task leaves datatrove's dependent arrays pending for ever.
    sbatch_args: dict[str, Any] = {"kill-on-invalid-dep": "yes"}
    if s.account:
        sbatch_args["account"] = s.account
    if s.mem:
        sbatch_args["mem"] = s.mem
    previous = None
    for stage in stages:
        previous = SlurmPipelineExecutor(
            pipeline=stage.pipeline, tasks=stage.tasks, workers=stage.workers, time=s.time,
            partition=s.partition, cpus_per_task=s.cpus_per_task, job_name=f"{label}-{stage.name}",
            logging_dir=str(logs / stage.name), depends=previous, env_command=s.setup,
            sbatch_args=sbatch_args or None, mail_type="NONE",
        )
    started = time.perf_counter()
    previous.run()  # submits the whole chain, dependencies first
    print(f"[{label}] submitted {len(stages)} Slurm job arrays; waiting", file=sys.stderr, flush=True)
    while True:
        left = {st.name: _incomplete(logs / st.name, st.tasks) for st in stages}
        if not any(left.values()):
            break
        queued = subprocess.run(["squeue", "--noheader", "--name", ",".join(f"{label}-{st.name}" for st in stages)],
                                capture_output=True, text=True).stdout.strip()
        if not queued:
            raise RuntimeError(f"Slurm jobs ended with incomplete tasks {left}; see {logs}/*/slurm_logs")
        time.sleep(poll_seconds)
    return {"slurm_total": time.perf_counter() - started}
