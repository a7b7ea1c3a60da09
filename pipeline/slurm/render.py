"""Batch scripts for the pipeline's Slurm jobs, rendered from the config and the templates in ``slurm/templates/``.

`render(cfg, stage)` fills one stage's template (a ``#SBATCH`` header built from ``slurm.*``, the
set-up line, the Python to run) into a `JobScript`; `snapshot_text(cfg)` is the validated config
(overrides applied, ``executor: local``) that every job runs, as
``python -m pipeline.cli <stage> <workdir>/slurm/config.yaml``, so the jobs run what was submitted
even if the YAML file changes meanwhile. Nothing here writes a file or calls Slurm; that is
pipeline.slurm.submit.

Safety: no config value reaches the scripts unchecked. ``#SBATCH`` values must be single tokens
matching a strict pattern (else `ConfigError` naming the key); paths in shell commands are quoted with
`shlex.quote`; the set-up line (``slurm.setup``), a shell line by definition, runs as written but
through ``eval`` of one quoted word, so it cannot reach past its own line.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import Config, ConfigError
from pipeline.core.stages import STAGES
from pipeline.slurm_values import option_problem, setup_problem, value_problem

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm" / "templates"
SNAPSHOT = "config.yaml"
JOB_PREFIX = "scratchgpt-"

_PATH_SAFE = re.compile(r"/[A-Za-z0-9_.,+=/@:-]*")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class JobScript:
    stage: str
    text: str
    path: Path  # where it is kept: <workdir>/slurm/<stage>.sbatch
    log_pattern: str  # --output, with %x and %j


# ---------------------------------------------------------------- validation


def check_value(key: str, value: str) -> str:
    """`value` if it is safe on an #SBATCH line for `slurm.<key>`, else a ConfigError naming the key."""
    problem = value_problem(key, value)
    if problem:
        raise ConfigError(f"`slurm.{key}`: {problem}")
    return value


def check_extra(index: int, option: str) -> str:
    problem = option_problem(option)
    if problem:
        raise ConfigError(f"`slurm.extra_sbatch.{index}`: {problem}")
    return option.strip()


def check_setup(setup: str) -> str:
    problem = setup_problem(setup)
    if problem:
        raise ConfigError(f"`slurm.setup`: {problem}")
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
    spec = STAGES[stage]
    if spec.ranks:
        lines += [f"--nodes={s.nodes}", f"--ntasks-per-node={s.tasks_per_node}", f"--cpus-per-task={s.cpus_per_task}",
                  f"--signal=USR1@{s.signal_seconds}", "--requeue", "--open-mode=append"]
        if s.gpus_per_node:
            lines.append(f"--gpus-per-node={s.gpus_per_node}")
    else:
        # With datatrove arrays the stage's own job only submits them and waits: one CPU is enough.
        cpus = 1 if s.data_arrays and spec.datatrove else s.cpus_per_task
        lines += ["--nodes=1", "--ntasks=1", f"--cpus-per-task={cpus}"]
        if spec.template == "finetune" and s.gpus_per_node:
            lines.append("--gpus-per-node=1")
    lines += [check_extra(i, option) for i, option in enumerate(s.extra_sbatch)]
    return [f"#SBATCH {line}" for line in lines]


def render(cfg: Config, stage: str) -> JobScript:
    """One stage's batch script, from its template and the config."""
    s = cfg.slurm
    if s.network_interface:
        check_value("network_interface", s.network_interface)
    config = slurm_dir(cfg) / SNAPSHOT
    arrays = s.data_arrays and STAGES[stage].datatrove
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
        # The job that releases a requeued pretraining job runs in the same partition and account.
        "release_options": " ".join(f"--{key}={check_value(key, value)}" for key, value in
                                    (("partition", s.partition), ("account", s.account)) if value),
    }
    text = render_template(STAGES[stage].template, values)
    return JobScript(stage, text, slurm_dir(cfg) / f"{stage}.sbatch", f"{slurm_dir(cfg) / 'logs'}/%x-%j.out")


def snapshot_text(cfg: Config) -> str:
    """The validated config as YAML, with `executor: local`: inside a job each stage runs where it is."""
    tree = cfg.model_dump(mode="json")
    tree["executor"] = "local"
    head = (f"# Written by `scratchgpt submit` from {_comment(str(cfg.source or '<defaults>'))} "
            f"at {time.strftime('%Y-%m-%d %H:%M:%S')}: the config the Slurm jobs run.\n")
    return head + yaml.safe_dump(tree, sort_keys=False)
