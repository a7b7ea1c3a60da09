"""The pipeline as a chain of Slurm jobs: submit the rendered scripts, record the job ids, report status.

`submit(cfg)` renders (pipeline.slurm.render) one batch script per stage that is not complete yet,
keeps them in ``<workdir>/slurm/`` with the config snapshot the jobs run, submits them with ``afterok``
dependencies (and ``--kill-on-invalid-dep=yes``, so a failed stage cancels its dependents instead
of leaving them pending forever) and records the job ids in ``<workdir>/slurm/jobs.json``.
`status(workdir)` reads that record back and says where each stage stands. Inside a job the stage
uses the local executor: datatrove's local executor on the job's CPUs for data stages, ``srun``
ranks for pretraining.

``python -m pipeline.slurm.submit complete CONFIG STAGE`` exits 0 when the stage's completion marker
matches the config: the pretraining script's test for "finished, or stopped to be requeued".
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataprep.private import write_private
from pipeline.config import Config, ConfigError, load_config
from pipeline.redact import redact
from pipeline.slurm.render import JOB_PREFIX, SNAPSHOT, JobScript, render, slurm_dir, snapshot_text

JOBS_FILE = "jobs.json"
# Slurm job states after which a job runs no more (PENDING/RUNNING/REQUEUED/... are still on the way).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT"}


@dataclass
class Submission:
    workdir: Path
    jobs: dict[str, str] = field(default_factory=dict)  # stage -> job id
    skipped: list[str] = field(default_factory=list)
    scripts: list[JobScript] = field(default_factory=list)


# ---------------------------------------------------------------- submission


def log_path(cfg: Config, stage: str, job_id: str) -> Path:
    return slurm_dir(cfg) / "logs" / f"{JOB_PREFIX}{stage}-{job_id}.out"


def _sbatch(script: Path, dependency: list[str]) -> str:
    args = ["sbatch", "--parsable"]
    if dependency:
        args += [f"--dependency=afterok:{':'.join(dependency)}", "--kill-on-invalid-dep=yes"]
    out = subprocess.run([*args, str(script)], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise ConfigError(f"sbatch {script} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def plan(cfg: Config) -> tuple[list[JobScript], list[str]]:
    """The scripts of the stages still to run, and the stages skipped as complete. Renders all before any submit,
    so a bad value fails before anything is queued."""
    from pipeline.core.runner import is_done
    from pipeline.core.stages import STAGES

    scripts, skipped = [], []
    for name in STAGES:
        if is_done(cfg, name):
            skipped.append(name)
        else:
            scripts.append(render(cfg, name))
    return scripts, skipped


def queued_jobs(workdir: Path) -> dict[str, str]:
    """Stages of the last submission whose jobs are still pending or running: stage -> state."""
    record = read_record(workdir)
    if record is None:
        return {}
    waiting = {}
    for stage, entry in record["stages"].items():
        try:
            state = job_state(entry["job_id"])
        except SlurmUnreachable:
            continue  # sbatch will say what is wrong with Slurm
        if state and state.get("JobState") not in ENDED:
            waiting[stage] = f"{entry['job_id']} {state.get('JobState')}"
    return waiting


def submit(cfg: Config, dry_run: bool = False, out: Any = None) -> Submission:
    """Render, (unless dry_run) keep and submit the scripts of every incomplete stage, chained with afterok."""
    out = out or sys.stdout
    scripts, skipped = plan(cfg)
    sub = Submission(Path(cfg.workdir).resolve(), skipped=skipped, scripts=scripts)
    for name in skipped:
        print(f"[submit] {name}: complete, skipped", file=out)
    if not scripts:
        print(f"[submit] every stage is complete under {sub.workdir}; nothing to submit", file=out)
        return sub
    if dry_run:
        for i, script in enumerate(scripts):
            after = [f"<{s.stage} job id>" for s in scripts[:i]]
            dep = f" --dependency=afterok:{':'.join(after)} --kill-on-invalid-dep=yes" if after else ""
            print(f"# ---- {script.path} (sbatch --parsable{dep} {script.path})", file=out)
            print(redact(script.text), file=out)  # the script written for sbatch keeps the real values
        print(f"# dry run: nothing written or submitted; the jobs would run {slurm_dir(cfg) / SNAPSHOT}", file=out)
        return sub
    if shutil.which("sbatch") is None:
        raise ConfigError("executor: slurm, but `sbatch` is not on PATH (is this a Slurm login node?)")
    waiting = queued_jobs(sub.workdir)
    if waiting:
        listed = ", ".join(f"{stage} (job {state})" for stage, state in waiting.items())
        raise ConfigError(f"{sub.workdir} has jobs of an earlier submission still queued: {listed}; wait for them "
                          f"or scancel them before submitting again")
    check_unlocked(cfg)
    base = prepare(cfg)
    record: dict[str, Any] = {"submitted": time.time(), "config": str(base / SNAPSHOT),
                              "source": str(cfg.source or ""), "skipped": skipped, "stages": {}}
    submitted: list[str] = []
    try:
        for script in scripts:
            script.path.write_text(script.text)
            job_id = _sbatch(script.path, submitted)
            submitted.append(job_id)
            sub.jobs[script.stage] = job_id
            record["stages"][script.stage] = {"job_id": job_id, "script": str(script.path),
                                              "log": str(log_path(cfg, script.stage, job_id))}
            after = f" (afterok {':'.join(submitted[:-1])})" if len(submitted) > 1 else ""
            print(f"[submit] {script.stage}: job {job_id}{after}, log {log_path(cfg, script.stage, job_id)}", file=out)
    finally:
        _write_record(base, record)  # also the jobs queued before a failed sbatch, so status and scancel find them
    print(f"[submit] logs: {base / 'logs'}/{JOB_PREFIX}<stage>-<job id>.out", file=out)
    print(f"[submit] follow with: scratchgpt status {sub.workdir}", file=out)
    return sub


def check_unlocked(cfg: Config) -> None:
    """Refuse to queue jobs into a workdir that a live local run is writing (the jobs would stop on its lock)."""
    from pipeline.core.lock import workdir_lock
    from pipeline.core.workdir import workdir_of

    with workdir_lock(workdir_of(cfg).lock, "submit"):
        pass


def prepare(cfg: Config) -> Path:
    """<workdir>/slurm with its logs folder and the config snapshot the jobs run; returns the folder."""
    base = slurm_dir(cfg)
    (base / "logs").mkdir(parents=True, exist_ok=True)
    write_private(base / SNAPSHOT, snapshot_text(cfg))  # it holds slurm.setup and tracking.uri: owner only
    load_config(base / SNAPSHOT)  # the jobs will load it: fail here, not in the queue
    return base


def _write_record(base: Path, record: dict[str, Any]) -> None:
    tmp = base / f"{JOBS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(base / JOBS_FILE)


def read_record(workdir: Path) -> dict[str, Any] | None:
    path = Path(workdir) / "slurm" / JOBS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); submit again to rewrite it") from None


# ---------------------------------------------------------------- status


class SlurmUnreachable(RuntimeError):
    """scontrol is missing or cannot reach the controller: a job's state is unknown, not forgotten."""


def job_state(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` fields of a job; None when Slurm no longer knows it (finished longer ago than
    MinJobAge). Raises SlurmUnreachable when Slurm cannot be asked."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise SlurmUnreachable("scontrol is not on PATH")
    try:
        out = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable("scontrol did not answer in 30 s") from None
    if out.returncode:
        if "Invalid job id" in out.stderr:
            return None
        raise SlurmUnreachable(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


@dataclass
class StageStatus:
    stage: str
    state: str  # complete, pending, running, failed, cancelled, unknown, not submitted, ...
    job_id: str | None = None
    detail: str = ""
    log: str | None = None

    @property
    def failed(self) -> bool:
        return self.state in ("failed", "cancelled", "timeout", "ended incomplete")


def _describe(stage: str, entry: dict[str, str], state: dict[str, str] | None) -> StageStatus:
    job_id, log = entry["job_id"], entry.get("log")
    if state is None:
        return StageStatus(stage, "unknown", job_id, "not complete, and Slurm no longer knows the job (it ended "
                           "a while ago): see its log", log)
    job_state_ = state.get("JobState", "?")
    reason, exit_code = state.get("Reason", "None"), state.get("ExitCode", "")
    if job_state_ in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED"):
        why = "waiting for its upstream jobs" if reason == "Dependency" else f"reason {reason}"
        restarts = state.get("Restarts", "0")
        again = f", requeued {restarts}x" if restarts not in ("", "0") else ""
        return StageStatus(stage, job_state_.lower(), job_id, f"{why}{again}", log)
    if job_state_ in ("RUNNING", "COMPLETING"):
        return StageStatus(stage, "running", job_id, f"on {state.get('NodeList', '?')}, {state.get('RunTime', '')}",
                           log)
    if job_state_ == "CANCELLED" and reason == "DependencyNeverSatisfied":
        return StageStatus(stage, "cancelled", job_id, "an upstream stage failed (afterok dependency never satisfied)")
    if job_state_ == "COMPLETED":
        # The job ended well but the marker does not match: the config changed since, or the stage was redone.
        return StageStatus(stage, "ended incomplete", job_id, "job COMPLETED but no matching completion marker", log)
    return StageStatus(stage, job_state_.lower(), job_id, f"exit code {exit_code}, reason {reason}", log)


def status(workdir: Path) -> list[StageStatus]:
    from pipeline.core.runner import is_done
    from pipeline.core.stages import STAGES

    workdir = Path(workdir)
    record = read_record(workdir)
    if record is None:
        raise ConfigError(f"{workdir / 'slurm' / JOBS_FILE} does not exist: nothing was submitted with "
                          f"`scratchgpt submit` for the workdir {workdir}")
    cfg = load_config(record["config"])
    result = []
    for name in STAGES:
        entry = record["stages"].get(name)
        if is_done(cfg, name):
            result.append(StageStatus(name, "complete", entry["job_id"] if entry else None,
                                      "" if entry else "before this submission"))
        elif entry is None:
            result.append(StageStatus(name, "not submitted", detail="incomplete: submit again"))
        else:
            try:
                result.append(_describe(name, entry, job_state(entry["job_id"])))
            except SlurmUnreachable as exc:
                result.append(StageStatus(name, "unknown", entry["job_id"], f"not complete; cannot ask Slurm: {exc}",
                                          entry.get("log")))
    return result


def format_status(rows: list[StageStatus]) -> str:
    lines = []
    for row in rows:
        job = f"job {row.job_id}" if row.job_id else "-"
        text = f"{row.stage:<10} {row.state:<16} {job:<12} {row.detail}".rstrip()
        # the log of a job that ran, failed or cannot be asked about; none for one still waiting for its turn
        if row.log and row.state != "complete" and (Path(row.log).exists() or row.failed or row.state == "unknown"):
            text += f"\n{'':<10} log: {row.log}"
        lines.append(text)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.slurm.submit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("complete", help="exit 0 when STAGE's completion marker matches CONFIG, else 1")
    p.add_argument("config", type=Path)
    p.add_argument("stage")
    p = sub.add_parser("task", help="say which rank runs on which node, then run `scratchgpt STAGE CONFIG` here")
    p.add_argument("stage")
    p.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    if args.command == "task":
        return run_task(args.stage, args.config)
    from pipeline.core.runner import is_done

    try:
        return 0 if is_done(load_config(args.config), args.stage) else 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_task(stage: str, config: Path) -> int:
    """One srun task: one line in the job log with its rank and node (both nodes took part, and where), then the
    stage in this same process, so Slurm's signals reach the trainer directly."""
    import socket

    from pipeline.core.runner import stage_main
    from training.launch import DistEnv, LaunchError

    try:
        env = DistEnv.from_config(load_config(config))
    except (LaunchError, ConfigError) as exc:
        print(f"[slurm] task on {socket.gethostname()}: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"[slurm] rank {env.rank}/{env.world_size} on {socket.gethostname()} (node {env.node_rank}, local rank "
          f"{env.local_rank}), master {env.master_addr}:{env.master_port}", flush=True)
    env.apply_to_environ()  # before the stage: rank 0 alone writes its marker and summary
    try:
        code = stage_main(stage, config)
    except SystemExit as exc:  # a stop by signal exits 0 from inside the stage: still leave together below
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Leave together: a rank that exits while another still holds the gloo context aborts
        # ("terminate called without an active exception"), and srun then fails the whole step.
        dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
