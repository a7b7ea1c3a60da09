"""Batch scripts rendered from the config, without a cluster: what lands on the #SBATCH lines, what the jobs run,
and that no config value can inject a shell command (checked by running bash on the rendered script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.slurm.render import render, snapshot_text
from pipeline.slurm.submit import plan, status

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    return tmp_path


def cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"workdir={tmp_path / 'w'}", "data.inputs=[in.jsonl]", "slurm.partition=debug",
                              *overrides])


def sbatch_options(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_pretrain_script_carries_the_config(inputs: Path) -> None:
    c = cfg(inputs, "slurm.nodes=4", "slurm.tasks_per_node=8", "slurm.cpus_per_task=6", "slurm.gpus_per_node=8",
            "slurm.account=proj_42", "slurm.mem=480G", "slurm.time=1-12:00:00", "slurm.signal_seconds=300",
            "slurm.extra_sbatch=[--qos=high, --exclusive, --constraint=a100]")
    script = render(c, "pretrain")
    opts = sbatch_options(script.text)
    work = (inputs / "w").resolve()
    assert opts == [
        "--job-name=scratchgpt-pretrain", f"--output={work}/slurm/logs/%x-%j.out", f"--chdir={inputs.resolve()}",
        "--time=1-12:00:00", "--partition=debug", "--account=proj_42", "--mem=480G", "--nodes=4",
        "--ntasks-per-node=8", "--cpus-per-task=6", "--signal=USR1@300", "--requeue", "--open-mode=append",
        "--gpus-per-node=8", "--qos=high", "--exclusive", "--constraint=a100",
    ]
    assert script.path == work / "slurm" / "pretrain.sbatch"
    lines = script.text.splitlines()
    # every #SBATCH line comes before the first command, or sbatch ignores it
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--ntasks-per-node=8 --cpus-per-task=6" in srun
    assert srun.endswith(f"-m pipeline.slurm.submit task pretrain {work}/slurm/config.yaml")
    assert 'scontrol requeuehold "${SLURM_JOB_ID}"' in script.text
    assert '--partition=debug --account=proj_42 --wrap "scontrol release ${SLURM_JOB_ID}"' in script.text


@pytest.mark.parametrize("arrays", [True, False])
def test_data_and_finetune_scripts_are_one_task_on_one_node(inputs: Path, arrays: bool) -> None:
    c = cfg(inputs, "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.cpus_per_task=16", f"slurm.data_arrays={arrays}")
    for stage in ("prep", "tokenizer", "shard", "finetune"):
        script = render(c, stage)
        opts = sbatch_options(script.text)
        # with datatrove arrays, prep and shard only submit the arrays and wait: one CPU
        in_arrays = arrays and stage in ("prep", "shard")
        assert {"--nodes=1", "--ntasks=1", f"--cpus-per-task={1 if in_arrays else 16}"} <= set(opts), (stage, opts)
        assert ("--gpus-per-node=1" in opts) == (stage == "finetune")
        assert not any(o.startswith(("--signal", "--requeue")) for o in opts)
        command = f"-m pipeline.cli {stage} {(inputs / 'w').resolve()}/slurm/config.yaml"
        assert script.text.rstrip().endswith(command + (" executor=slurm" if in_arrays else "")), script.text


def test_datatrove_arrays_need_a_partition(inputs: Path) -> None:
    with pytest.raises(ConfigError, match=r"`slurm.data_arrays` needs `slurm.partition`"):
        render(cfg(inputs, "slurm.partition=null", "slurm.data_arrays=true"), "prep")
    assert "executor=slurm" not in render(cfg(inputs, "slurm.partition=null"), "prep").text


def test_snapshot_is_the_config_with_the_local_executor(inputs: Path) -> None:
    from pipeline.core.identity import compute
    from pipeline.core.stages import STAGES

    c = cfg(inputs, "executor=slurm", "train.lr=0.01")
    snap = inputs / "snap.yaml"
    snap.write_text(snapshot_text(c))
    again = load_config(snap)
    assert again.executor == "local" and again.train.lr == 0.01
    # the same stage hashes: a stage finished in a job counts as complete for the submitted config
    assert [compute(again, s).hash for s in STAGES] == [compute(c, s).hash for s in STAGES]


@pytest.mark.parametrize(("key", "value"), [
    ("partition", "debug\n#SBATCH --wrap=rm -rf /"),
    ("partition", "debug; rm -rf /"),
    ("partition", "$(rm -rf /)"),
    ("account", "a`touch x`"),
    ("account", "acct --wrap=x"),
    ("time", "01:00:00\nrm -rf /"),
    ("mem", "4G && rm -rf /"),
    ("mem", "100%"),
    ("network_interface", "eth0;reboot"),
])
def test_sbatch_values_that_are_not_one_safe_token_are_refused(inputs: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"`slurm\.{key}`"):
        render(cfg(inputs, f"slurm.{key}={json.dumps(value)}"), "pretrain")


@pytest.mark.parametrize("option", ["--wrap=rm -rf /", "--qos=x\n#SBATCH --wrap=y", "-p debug", "--comment=$(id)",
                                    "--output=/tmp/x", "--dependency=afterany:1", "--x;rm"])
def test_extra_sbatch_lines_must_be_one_option_of_our_own(inputs: Path, option: str) -> None:
    with pytest.raises(ConfigError, match=r"`slurm\.extra_sbatch\.1`"):
        render(cfg(inputs, f"slurm.extra_sbatch={json.dumps(['--exclusive', option])}"), "prep")


@pytest.mark.parametrize("setup", ["module load x\nrm -rf /", "echo 'unterminated", "source a &&", "a\r b"])
def test_a_setup_line_that_is_not_one_complete_line_is_refused(inputs: Path, setup: str) -> None:
    with pytest.raises(ConfigError, match=r"`slurm\.setup`"):
        render(cfg(inputs, f"slurm.setup={json.dumps(setup)}"), "prep")


def test_paths_that_cannot_go_on_an_sbatch_line_are_refused(inputs: Path) -> None:
    with pytest.raises(ConfigError, match=r"`workdir`.*choose a plainer path"):
        render(cfg(inputs, f"workdir={json.dumps(str(inputs / 'my run'))}"), "prep")
    with pytest.raises(ConfigError, match=r"`workdir`"):
        render(cfg(inputs, f"workdir={json.dumps(str(inputs / 'w%j'))}"), "prep")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to run the rendered script")
@pytest.mark.parametrize("setup", [
    "export SETUP_RAN=yes; echo \"it's $SETUP_RAN\"",
    "echo one; echo two # a comment; touch INJECTED",
    "cat <<EOF",
    "echo 'a' \\",
    "false",
])
def test_the_setup_line_runs_as_written_and_stays_on_its_line(inputs: Path, setup: str) -> None:
    # Run the real rendered script with bash, with stand-ins for python, srun and scontrol on PATH: whatever
    # the setup line holds, the lines after it still run, and only what it says runs.
    bin_dir = inputs / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\"\n")
        (bin_dir / tool).chmod(0o755)
    try:
        script = render(cfg(inputs, f"slurm.setup={json.dumps(setup)}"), "tokenizer")
    except ConfigError as exc:  # refusing is also safe; these must render though
        pytest.fail(f"refused {setup!r}: {exc}")
    text = script.text.replace(sys.executable, "echo")  # the stage command: echoed, not run
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    out = subprocess.run(["bash", "-c", text], capture_output=True, text=True, env=env, cwd=inputs, timeout=30)
    assert not (inputs / "INJECTED").exists()
    if setup.startswith("export"):
        assert out.returncode == 0, out.stderr
        assert "it's yes" in out.stdout
    if out.returncode == 0:
        assert out.stdout.rstrip().endswith(f"-m pipeline.cli tokenizer {(inputs / 'w').resolve()}/slurm/config.yaml")
    else:  # a setup line that fails stops the job with a message, before the stage
        assert "slurm.setup failed" in out.stdout and "pipeline.cli" not in out.stdout


def test_complete_stages_are_skipped(inputs: Path) -> None:
    from pipeline.core.runner import write_marker

    c = cfg(inputs)
    write_marker(c, "prep", {}, 0.0)
    scripts, skipped = plan(c)
    assert skipped == ["prep"] and [s.stage for s in scripts] == ["tokenizer", "shard", "pretrain", "finetune"]
    write_marker(load_config(None, [f"workdir={inputs / 'w'}", "data.inputs=[in.jsonl]", "prep.tasks=9"]),
                 "tokenizer", {}, 0.0)  # written under another config: not complete for this one
    assert plan(c)[1] == ["prep"]


def test_dry_run_prints_every_script_and_writes_nothing(inputs: Path, capsys: pytest.CaptureFixture) -> None:
    config = inputs / "c.yaml"
    config.write_text(f"workdir: {inputs / 'w'}\ndata: {{inputs: [in.jsonl]}}\nslurm: {{nodes: 2}}\n")
    assert main(["submit", str(config), "slurm.partition=debug", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 5
    assert "--dependency=afterok:<prep job id>:<tokenizer job id>:<shard job id> --kill-on-invalid-dep=yes" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --partition=debug" in out
    assert not (inputs / "w").exists()


def test_bad_values_fail_before_anything_is_submitted(inputs: Path, capsys: pytest.CaptureFixture) -> None:
    config = inputs / "c.yaml"
    config.write_text(f"workdir: {inputs / 'w'}\ndata: {{inputs: [in.jsonl]}}\n")
    assert main(["submit", str(config), "slurm.partition=debug", "slurm.account=a;b"]) == 2
    assert "`slurm.account`" in capsys.readouterr().err
    assert not (inputs / "w").exists()


def test_status_without_a_submission_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="nothing was submitted"):
        status(tmp_path)
    assert main(["status", str(tmp_path)]) == 2
    assert "jobs.json does not exist" in capsys.readouterr().err


def test_help_stays_light() -> None:
    # the CLI module list must not pull torch/deepspeed/datatrove/mlflow in at import time
    code = ("import sys; from pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'datatrove', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def fake_submission(inputs: Path) -> Path:
    """A workdir as `scratchgpt submit` leaves it: the config snapshot and jobs.json, prep already complete."""
    from pipeline.core.runner import write_marker
    from pipeline.slurm.submit import prepare

    c = cfg(inputs)
    base = prepare(c)
    write_marker(c, "prep", {}, 0.0)
    stages = {s: {"job_id": str(10 + i), "script": str(base / f"{s}.sbatch"), "log": str(base / "logs" / f"{s}.out")}
              for i, s in enumerate(["prep", "tokenizer", "shard", "pretrain"])}
    (base / "jobs.json").write_text(json.dumps({"config": str(base / "config.yaml"), "stages": stages}))
    return (inputs / "w").resolve()


def test_status_reads_markers_and_says_when_slurm_cannot_be_asked(inputs: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    workdir = fake_submission(inputs)
    monkeypatch.setenv("PATH", str(inputs))  # no scontrol here
    rows = {row.stage: row for row in status(workdir)}
    assert (rows["prep"].state, rows["prep"].job_id) == ("complete", "10")
    assert rows["tokenizer"].state == "unknown" and "scontrol is not on PATH" in rows["tokenizer"].detail
    assert rows["tokenizer"].log == str(workdir / "slurm" / "logs" / "tokenizer.out")
    assert rows["finetune"].state == "not submitted"
    assert main(["status", str(workdir)]) == 0  # nothing known to have failed
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["prep", "complete", "job", "10"]
    assert out[2].strip() == f"log: {workdir / 'slurm' / 'logs' / 'tokenizer.out'}"


def test_run_with_the_slurm_executor_submits(inputs: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    config = inputs / "c.yaml"
    config.write_text(f"workdir: {inputs / 'w'}\ndata: {{inputs: [in.jsonl]}}\nexecutor: slurm\n")
    monkeypatch.setenv("PATH", str(inputs))  # no sbatch: `run` must go the submit way and say so, running nothing
    assert main(["run", str(config)]) == 2
    assert "`sbatch` is not on PATH" in capsys.readouterr().err
    assert not (inputs / "w" / "prep").exists()


def test_pretrain_may_ask_for_a_node_range(inputs: Path) -> None:
    text = render(cfg(inputs, "slurm.nodes=1-2", "slurm.tasks_per_node=4"), "pretrain").text
    assert "--nodes=1-2" in sbatch_options(text)
    # The step follows the nodes this run got, not the task count the job was submitted with.
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert '--nodes="${SLURM_JOB_NUM_NODES}" --ntasks="$((SLURM_JOB_NUM_NODES * 4))"' in srun
    assert cfg(inputs, "slurm.nodes=3").slurm.nodes == 3
    for bad in ("0", "2-1", "two", "1-", "1-2-3"):
        with pytest.raises(ConfigError, match="node count .* or a range"):
            cfg(inputs, f"slurm.nodes={bad}")
