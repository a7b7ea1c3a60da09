"""The pipeline as a chain of Slurm jobs: render sbatch scripts from the config, submit them, report status.

`submit(cfg)` renders one batch script per stage that is not complete yet (templates in
``slurm/templates/``), keeps them in ``<workdir>/slurm/``, submits them with ``afterok``
dependencies (and ``--kill-on-invalid-dep=yes``, so a failed stage cancels its dependents instead
of leaving them pending forever) and records the job ids in ``<workdir>/slurm/jobs.json``.
`status(workdir)` reads that record back and says where each stage stands.

Every job runs ``python -m pipeline.cli <stage> <workdir>/slurm/config.yaml``: a snapshot of the
validated config (overrides applied, ``executor: local``) taken at submission, so the jobs run what
was submitted even if the YAML file changes meanwhile. Inside a job the stage uses the local executor:
datatrove's local executor on the job's CPUs for data stages, ``srun`` ranks for pretraining.

Safety: no config value reaches the scripts unchecked. ``#SBATCH`` values must be single tokens
matching a strict pattern (else `ConfigError` naming the key); paths in shell commands are quoted with
`shlex.quote`; the set-up line (``slurm.setup``), a shell line by definition, runs as written but
through ``eval`` of one quoted word, so it cannot reach past its own line.

``python -m pipeline.slurm_submit complete CONFIG STAGE`` exits 0 when the stage's completion marker
matches the config: the pretraining script's test for "finished, or stopped to be requeued".
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, load_config

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm" / "templates"
JOBS_FILE = "jobs.json"
SNAPSHOT = "config.yaml"
JOB_PREFIX = "scratchgpt-"
DATA_STAGES = ("prep", "tokenizer", "shard")
ARRAY_STAGES = ("prep", "shard")  # the data stages built from datatrove steps (the tokenizer trains in-process)
# Slurm job states after which a job runs no more (PENDING/RUNNING/REQUEUED/... are still on the way).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT"}

# What an #SBATCH value may be: one token, no whitespace, quotes, `$`, backquote, `;`, `&`, `|`, `#`,
# redirections or `%` (Slurm expands %-patterns in some options).
_TOKEN = r"[A-Za-z0-9_.,:+=/@-]+"
PATTERNS: dict[str, tuple[str, str]] = {
    "partition": (r"[A-Za-z0-9_.,-]+", "partition names separated by commas"),
    "account": (r"[A-Za-z0-9_.-]+", "an account name"),
    "time": (r"(?:\d+-)?\d+(?::\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE|unlimited|infinite",
             "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    "mem": (r"\d+[KMGT]?B?", "a size such as 16G or 4000M"),
    "network_interface": (r"[A-Za-z0-9_.:-]+(?:,[A-Za-z0-9_.:-]+)*", "interface names separated by commas"),
}
_EXTRA = re.compile(r"--([a-z][a-z0-9-]*)(?:=(" + _TOKEN + r"))?")
# Options the scripts set themselves (or that would replace the script): refused in extra_sbatch.
_OWNED = {"wrap", "output", "error", "job-name", "chdir", "dependency", "kill-on-invalid-dep", "array", "nodes",
          "ntasks", "ntasks-per-node", "signal", "requeue", "no-requeue", "open-mode", "parsable", "export-file"}
_PATH_SAFE = re.compile(r"/[A-Za-z0-9_.,+=/@:-]*")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class JobScript:
    stage: str
    text: str
    path: Path  # where it is kept: <workdir>/slurm/<stage>.sbatch
    log_pattern: str  # --output, with %x and %j


@dataclass
class Submission:
    workdir: Path
    jobs: dict[str, str] = field(default_factory=dict)  # stage -> job id
    skipped: list[str] = field(default_factory=list)
    scripts: list[JobScript] = field(default_factory=list)


# ---------------------------------------------------------------- validation


def check_value(key: str, value: str) -> str:
    """`value` if it is safe on an #SBATCH line for `slurm.<key>`, else a ConfigError naming the key."""
    pattern, what = PATTERNS[key]
    if not re.fullmatch(pattern, value):
        raise ConfigError(f"`slurm.{key}`: {value!r} is not allowed in a batch script (expected {what}, one token "
                          "of letters, digits and . _ - , :)")
    return value


def check_extra(index: int, option: str) -> str:
    match = _EXTRA.fullmatch(option.strip())
    if not match:
        raise ConfigError(f"`slurm.extra_sbatch.{index}`: {option!r} is not one sbatch option of the form "
                          "--name or --name=value (value one token of letters, digits and . _ - , : + = / @)")
    if match.group(1) in _OWNED:
        raise ConfigError(f"`slurm.extra_sbatch.{index}`: --{match.group(1)} is set by scratchgpt submit itself; "
                          "use the matching slurm.* key or remove it")
    return option.strip()


def check_setup(setup: str) -> str:
    """The set-up line must be one line of valid shell; it runs as written (it is the user's own command)."""
    if any(ch in setup for ch in "\n\r\0"):
        raise ConfigError("`slurm.setup`: must be one line (no newline, carriage return or NUL); "
                          "join commands with ; or &&")
    bash = shutil.which("bash")
    if bash:
        out = subprocess.run([bash, "-n", "-c", setup], capture_output=True, text=True, timeout=10)
        if out.returncode:
            raise ConfigError(f"`slurm.setup`: not valid shell: {out.stderr.strip()}")
    return setup


def check_path(key: str, path: Path) -> str:
    text = str(path)
    if not _PATH_SAFE.fullmatch(text):
        raise ConfigError(f"`{key}`: the path {text!r} cannot go on an #SBATCH line (spaces, quotes, %, $ and other "
                          "shell characters are not allowed); choose a plainer path")
    return text


def _comment(text: str) -> str:
    """Text safe inside a comment line: printable, no line breaks."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


# ---------------------------------------------------------------- rendering


def render_template(name: str, values: dict[str, str]) -> str:
    path = TEMPLATES / f"{name}.sbatch"
    if not path.is_file():
        raise ConfigError(f"sbatch template {path} is missing (scratchgpt submit needs the project's slurm/ folder)")
    text = path.read_text()

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise KeyError(f"template {path} uses {{{{{match.group(1)}}}}}, which the renderer does not provide")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, text)


def slurm_dir(cfg: Config) -> Path:
    return Path(cfg.workdir).resolve() / "slurm"


def sbatch_lines(cfg: Config, stage: str) -> list[str]:
    """The #SBATCH lines of one stage's script, every value checked."""
    s = cfg.slurm
    logs = check_path("workdir", slurm_dir(cfg) / "logs")
    cwd = check_path("the current directory", Path.cwd())  # relative paths in the config are relative to it
    lines = [f"--job-name={JOB_PREFIX}{stage}", f"--output={logs}/%x-%j.out", f"--chdir={cwd}",
             f"--time={check_value('time', s.time)}"]
    if s.partition:
        lines.append(f"--partition={check_value('partition', s.partition)}")
    if s.account:
        lines.append(f"--account={check_value('account', s.account)}")
    if s.mem:
        lines.append(f"--mem={check_value('mem', s.mem)}")
    if stage == "pretrain":
        lines += [f"--nodes={s.nodes}", f"--ntasks-per-node={s.tasks_per_node}", f"--cpus-per-task={s.cpus_per_task}",
                  f"--signal=USR1@{s.signal_seconds}", "--requeue", "--open-mode=append"]
        if s.gpus_per_node:
            lines.append(f"--gpus-per-node={s.gpus_per_node}")
    else:
        # With datatrove arrays the stage's own job only submits them and waits: one CPU is enough.
        cpus = 1 if s.data_arrays and stage in ARRAY_STAGES else s.cpus_per_task
        lines += ["--nodes=1", "--ntasks=1", f"--cpus-per-task={cpus}"]
        if stage == "finetune" and s.gpus_per_node:
            lines.append("--gpus-per-node=1")
    lines += [check_extra(i, option) for i, option in enumerate(s.extra_sbatch)]
    return [f"#SBATCH {line}" for line in lines]


def render(cfg: Config, stage: str) -> JobScript:
    """One stage's batch script, from its template and the config."""
    s = cfg.slurm
    if s.network_interface:
        check_value("network_interface", s.network_interface)
    config = slurm_dir(cfg) / SNAPSHOT
    arrays = s.data_arrays and stage in ARRAY_STAGES
    if arrays and not s.partition:
        raise ConfigError("`slurm.data_arrays` needs `slurm.partition`: datatrove writes it into every array job "
                          "(or set slurm.data_arrays: false)")
    mode = ("Its datatrove steps run as Slurm job arrays (named <stage>-<step>, logs under <workdir>/<stage>/logs/"
            "<step>/slurm_logs); this job submits them and waits." if arrays else
            f"datatrove's local executor runs the stage's tasks inside this job, on {s.cpus_per_task} CPU(s).")
    setup = "# (no slurm.setup)"
    if s.setup:  # the user's own shell line, run as written, but as one quoted word: it ends on its own line
        setup = (f"eval {shlex.quote(check_setup(s.setup))} "
                 '|| { echo "[slurm] slurm.setup failed with exit $?"; exit 1; }')
    values = {
        "stage": stage,
        "source": _comment(str(cfg.source or "<defaults>")),
        "sbatch": "\n".join(sbatch_lines(cfg, stage)),
        "setup": setup,
        "python": shlex.quote(sys.executable),
        "bin_dir": shlex.quote(str(Path(sys.executable).parent)),
        "mode": mode,
        "stage_args": " executor=slurm" if arrays else "",
        "config": shlex.quote(str(config)),
        "nodes": str(s.nodes),
        "tasks_per_node": str(s.tasks_per_node),
        "signal_seconds": str(s.signal_seconds),
        "srun_options": f"--ntasks-per-node={s.tasks_per_node} --cpus-per-task={s.cpus_per_task}",
    }
    template = "data" if stage in DATA_STAGES else stage
    text = render_template(template, values)
    return JobScript(stage, text, slurm_dir(cfg) / f"{stage}.sbatch", f"{slurm_dir(cfg) / 'logs'}/%x-%j.out")


def snapshot_text(cfg: Config) -> str:
    """The validated config as YAML, with `executor: local`: inside a job each stage runs where it is."""
    tree = cfg.model_dump(mode="json")
    tree["executor"] = "local"
    head = (f"# Written by `scratchgpt submit` from {_comment(str(cfg.source or '<defaults>'))} "
            f"at {time.strftime('%Y-%m-%d %H:%M:%S')}: the config the Slurm jobs run.\n")
    return head + yaml.safe_dump(tree, sort_keys=False)


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
    from pipeline.stages import STAGES, is_complete

    scripts, skipped = [], []
    for name in STAGES:
        if is_complete(cfg, name):
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
            print(script.text, file=out)
        print(f"# dry run: nothing written or submitted; the jobs would run {slurm_dir(cfg) / SNAPSHOT}", file=out)
        return sub
    if shutil.which("sbatch") is None:
        raise ConfigError("executor: slurm, but `sbatch` is not on PATH (is this a Slurm login node?)")
    waiting = queued_jobs(sub.workdir)
    if waiting:
        listed = ", ".join(f"{stage} (job {state})" for stage, state in waiting.items())
        raise ConfigError(f"{sub.workdir} has jobs of an earlier submission still queued: {listed}; wait for them "
                          f"or scancel them before submitting again")
    from pipeline.stages import start_clean

    for script in scripts:  # here, once, before any rank of a multi-process job could be reading them
        start_clean(cfg, script.stage)
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


def prepare(cfg: Config) -> Path:
    """<workdir>/slurm with its logs folder and the config snapshot the jobs run; returns the folder."""
    base = slurm_dir(cfg)
    (base / "logs").mkdir(parents=True, exist_ok=True)
    (base / SNAPSHOT).write_text(snapshot_text(cfg))
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
    from pipeline.stages import STAGES, is_complete

    workdir = Path(workdir)
    record = read_record(workdir)
    if record is None:
        raise ConfigError(f"{workdir / 'slurm' / JOBS_FILE} does not exist: nothing was submitted with "
                          f"`scratchgpt submit` for the workdir {workdir}")
    cfg = load_config(record["config"])
    result = []
    for name in STAGES:
        entry = record["stages"].get(name)
        if is_complete(cfg, name):
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

    parser = argparse.ArgumentParser(prog="python -m pipeline.slurm_submit")
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
    from pipeline.stages import is_complete

    try:
        return 0 if is_complete(load_config(args.config), args.stage) else 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_task(stage: str, config: Path) -> int:
    """One srun task: one line in the job log with its rank and node (both nodes took part, and where), then the
    stage in this same process, so Slurm's signals reach the trainer directly."""
    import socket

    from pipeline.cli import main as cli_main
    from pipeline.launch import DistEnv, LaunchError

    try:
        env = DistEnv.from_config(load_config(config))
    except (LaunchError, ConfigError) as exc:
        print(f"[slurm] task on {socket.gethostname()}: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"[slurm] rank {env.rank}/{env.world_size} on {socket.gethostname()} (node {env.node_rank}, local rank "
          f"{env.local_rank}), master {env.master_addr}:{env.master_port}", flush=True)
    env.apply_to_environ()  # before the stage: rank 0 alone writes its marker and summary
    code = cli_main([stage, str(config)])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Leave together: a rank that exits while another still holds the gloo context aborts
        # ("terminate called without an active exception"), and srun then fails the whole step.
        dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
