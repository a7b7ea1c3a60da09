"""Elastic resume under Slurm on the real test bed: a pretraining job on 2 nodes is preempted (USR1) while one
of its nodes is drained, requeues itself, runs again on the 1 node left and finishes with the loss of an unbroken
run.

SG_PREEMPT_REPEAT=N runs the preemption N times in a row (the issue asks for 20)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_slurm_pipeline import (
    STEPS,
    hurry_requeued,
    job_log,
    pretrain_config,
    scratchgpt,
    slurm_keys,
    submit_pretrain,
    train_losses,
)
from train_helpers import build_workdir

pytestmark = pytest.mark.slurm

ELASTIC = ["train.global_batch_size=8"]  # 4 sequences x 1 micro-step x 2 nodes, or x 2 micro-steps x 1 node
REPEAT = int(os.environ.get("SG_PREEMPT_REPEAT", "1"))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("base")
    build_workdir(workdir)
    return workdir


@pytest.fixture(scope="module")
def unbroken(base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The reference: one process outside Slurm with the same global batch (2 micro-steps of 4)."""
    workdir = tmp_path_factory.mktemp("unbroken") / "w"
    config = pretrain_config(base, workdir, *ELASTIC)
    result = scratchgpt("pretrain", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(REPEAT))
def test_preempted_on_two_nodes_requeued_onto_one_finishes_like_an_unbroken_run(
        slurm_cluster, base: Path, unbroken: list[float], tmp_path: Path, attempt: int) -> None:
    workdir = tmp_path / "w"
    config = pretrain_config(base, workdir, *slurm_keys(slurm_cluster, 2), *ELASTIC)
    job_id = submit_pretrain(slurm_cluster, workdir, config)
    log = job_log(workdir, "pretrain", job_id)
    deadline = time.monotonic() + 150
    while not (log.exists() and re.search(r"^\[pretrain\] step 2/", log.read_text(), re.MULTILINE)):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "<no log>"
        assert slurm_cluster.job_state(job_id)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    assert "[slurm] rank 1/2" in log.read_text()
    # The cluster shrinks: the second node is drained (the running job goes on there), so the requeued run
    # cannot have it, and is given one node.
    second = slurm_cluster.nodes[1]
    slurm_cluster.run("scontrol", "update", f"NodeName={second}", "State=DRAIN", "Reason=elastic-test")
    try:
        slurm_cluster.run("scancel", "--signal=USR1", job_id)
        shrunk = False
        deadline = time.monotonic() + 300
        while (state := slurm_cluster.job_state(job_id))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED"):
            assert time.monotonic() < deadline, state
            if state["Restarts"] != "0" and state["JobState"] == "PENDING":
                if not shrunk:  # what the job may take now: one node, one task (Slurm keeps 2 x 1 otherwise)
                    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1",
                                      "NumCPUs=1")
                    shrunk = True
            hurry_requeued(slurm_cluster, job_id, state)
            time.sleep(0.5)
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={second}", "State=RESUME"], capture_output=True)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", f"{state}\n{text[-4000:]}"
    assert state["Restarts"] == "1", state  # requeued once, by the job itself
    stopped = re.search(r"stopped by signal after step (\d+)", text)
    assert stopped, text[-4000:]
    step = int(stopped.group(1))
    assert re.search(rf"\[pretrain\] resumed from \S+step_{step:08d} at step {step} \(written by 2 processes\) "
                     r"on 1 process", text), text[-4000:]
    assert "terminate called" not in text
    losses = train_losses(workdir)
    assert len(losses) == STEPS
    assert losses[step:] == pytest.approx(unbroken[step:], rel=1e-4)
    assert losses[-1] == pytest.approx(unbroken[-1], rel=1e-4)
