"""The pipeline as Slurm jobs on the real test bed: 2-node ZeRO-3 pretraining through sbatch, the whole chain
through `scratchgpt submit`, preemption (USR1 -> checkpoint -> requeue -> resume), and a failing stage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared training helpers
from train_helpers import SHAKESPEARE, TINY, build_workdir, cli_env, copy_inputs, write_yaml  # noqa: E402

from pipeline.config import load_config  # noqa: E402

pytestmark = pytest.mark.slurm

VENV_BIN = Path(sys.executable).parent
SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"
# Long enough that a USR1 sent after the first logged steps lands mid-run; short enough for CI.
STEPS = 16
TRAIN = [*TINY, f"train.max_steps={STEPS}", "train.eval_every=1000", "train.checkpoint_every=1000",
         "train.sample_tokens=0", "tracking.experiment=t"]


def scratchgpt(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "scratchgpt"), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=cwd)


def slurm_keys(cluster, nodes: int) -> list[str]:
    return ["slurm.partition=debug", f"slurm.nodes={nodes}", "slurm.tasks_per_node=1", "slurm.time=00:10:00",
            f"slurm.network_interface={cluster.node_interface}"]


def mlflow_runs(workdir: Path, experiment: str = "t") -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {workdir / 'mlflow.db'}"
    return client, client.search_runs([exp.experiment_id])


def train_losses(workdir: Path) -> list[float]:
    client, runs = mlflow_runs(workdir)
    (run,) = [r for r in runs if r.data.tags.get("stage") == "pretrain"]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]


def job_log(workdir: Path, stage: str, job_id: str) -> Path:
    return workdir / "slurm" / "logs" / f"scratchgpt-{stage}-{job_id}.out"


def submit_pretrain(cluster, workdir: Path, config: Path) -> str:
    """The pretrain stage's own batch script, rendered from the config, through sbatch."""
    from pipeline.slurm.render import render
    from pipeline.slurm.submit import prepare

    cfg = load_config(config)
    prepare(cfg)
    script = render(cfg, "pretrain")
    script.path.write_text(script.text)
    # sbatch passes its environment on to the job: not this process's MLflow store (the helpers set one).
    out = subprocess.run(["sbatch", "--parsable", str(script.path)], capture_output=True, text=True, timeout=30,
                         env=cli_env())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def nodes_settled(cluster) -> bool:
    """No node still running or completing the first run (a launch onto a completing node fails)."""
    return all(state in ("idle", "drained") for state in cluster.run("sinfo", "-h", "-N", "-o", "%T").split())


def hurry_requeued(cluster, job_id: str, state: dict[str, str]) -> None:
    """Start at once what waits only on the clock, once the first run has left its nodes: the pending release
    job (queued by the job with --begin=now+30; the e2e tests run one at a time, so it is this job's) and the
    released job (Slurm holds a requeued job for its credential lifetime, 120 s). The release job still frees
    the requeued one: the test bed only saves the waits, so the 30 s delay itself goes untested."""
    if state["Restarts"] == "0" or state["JobState"] != "PENDING" or not nodes_settled(cluster):
        return
    waiting = cluster.run("squeue", "-h", "-n", "scratchgpt-release", "-t", "PENDING", "-o", "%i %r").splitlines()
    hurry = [job for job, reason in (line.split(maxsplit=1) for line in waiting) if reason == "BeginTime"]
    if state.get("Reason") == "BeginTime":
        hurry.append(job_id)
    for job in hurry:
        # Best effort: the scheduler may start the job between the query and the update, which then fails.
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("base")
    build_workdir(workdir)
    return workdir


def pretrain_config(base: Path, workdir: Path, *overrides: str) -> Path:
    copy_inputs(base, workdir)
    return write_yaml(workdir.parent / f"{workdir.name}.yaml",
                      [f"workdir={workdir}", "tokenizer.vocab_size=300", *TRAIN, *overrides])


@pytest.fixture(scope="module")
def one_process(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process outside Slurm, 2 micro-batches of 4 per step (the 2-node global batch)."""
    workdir = tmp_path_factory.mktemp("one") / "w"
    result = scratchgpt("pretrain", str(pretrain_config(base, workdir, "train.grad_accum=2")))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster, base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The pretrain batch script on 2 nodes x 1 task, ZeRO-3 over gloo; one micro-batch of 4 per rank."""
    workdir = tmp_path_factory.mktemp("two") / "w"
    config = pretrain_config(base, workdir, *slurm_keys(slurm_cluster, 2))
    job_id = submit_pretrain(slurm_cluster, workdir, config)
    state = slurm_cluster.wait(job_id, timeout=180)
    log = job_log(workdir, "pretrain", job_id)
    text = log.read_text() if log.exists() else "<no log>"
    assert state["JobState"] == "COMPLETED", f"job {job_id} {state['JobState']}:\n{text[-4000:]}"
    return workdir, job_id, text


@pytest.mark.slow
def test_two_node_zero3_pretraining_through_sbatch(slurm_cluster, two_nodes, one_process: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from training.checkpoint import full_state_dict

    workdir, job_id, text = two_nodes
    ranks = dict(re.findall(r"^\[slurm\] rank (\d)/2 on (\S+) ", text, re.MULTILINE))
    assert ranks == {"0": slurm_cluster.nodes[0], "1": slurm_cluster.nodes[1]}, text[-3000:]
    assert "[slurm] pretrain complete" in text
    assert json.loads((workdir / "pretrain" / "_COMPLETE.json").read_text())["summary"]["world_size"] == 2
    # Both ranks held a ZeRO-3 partition; joined, they train like one process with the same global batch.
    assert full_state_dict(workdir / "pretrain" / "checkpoints")[1]["world_size"] == 2
    two, one = train_losses(workdir), train_losses(one_process)
    assert len(two) == len(one) == STEPS
    assert two == pytest.approx(one, rel=1e-4)
    assert two[-1] < two[0] - 0.5  # and it learned
    model = GPT2LMHeadModel.from_pretrained(workdir / "pretrain" / "export").eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 300) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(slurm_cluster, two_nodes, base: Path,
                                                                tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    config = pretrain_config(base, workdir, *slurm_keys(slurm_cluster, 2))
    job_id = submit_pretrain(slurm_cluster, workdir, config)
    log = job_log(workdir, "pretrain", job_id)
    deadline = time.monotonic() + 120
    while not (log.exists() and re.search(r"^\[pretrain\] step 2/", log.read_text(), re.MULTILINE)):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "<no log>"
        assert slurm_cluster.job_state(job_id)["JobState"] in ("PENDING", "RUNNING"), slurm_cluster.job_state(job_id)
        time.sleep(0.2)
    # What Slurm sends before the time limit (--signal=USR1@...): USR1 to the tasks of the job's steps.
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    deadline = time.monotonic() + 240
    while (state := slurm_cluster.job_state(job_id))["JobState"] != "COMPLETED":
        assert time.monotonic() < deadline, state
        if state["JobState"] in ("FAILED", "CANCELLED"):
            break
        hurry_requeued(slurm_cluster, job_id, state)
        time.sleep(0.5)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", f"{state}\n{text[-4000:]}"
    assert state["Restarts"] == "1", state  # requeued once, by the job itself (the test only hurries the waits)
    stopped = re.search(r"stopped by signal after step (\d+)", text)
    assert stopped and 2 <= int(stopped.group(1)) < STEPS, text[-4000:]
    step = int(stopped.group(1))
    assert "requeueing job" in text and f"job {job_id} requeued" in text
    assert re.search(rf"\[pretrain\] resumed from \S+ at step {step}\b", text), text[-4000:]
    assert text.count("[slurm] pretrain: job") == 2  # the same log, appended by the requeued run
    # The resumed run ends where an uninterrupted one does: same steps, same final loss.
    losses = train_losses(workdir)
    assert len(losses) == STEPS
    assert losses[-1] == pytest.approx(train_losses(two_nodes[0])[-1], rel=1e-5)


def shakespeare_jsonl(path: Path, docs: int = 60, lines_per_doc: int = 40) -> Path:
    lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines(keepends=True)
    with path.open("w") as out:
        for i in range(docs):
            out.write(json.dumps({"id": f"s{i}", "text": "".join(lines[i * lines_per_doc:(i + 1) * lines_per_doc])})
                      + "\n")
    return path


def sst2_slice(src: Path, dst: Path, rows: int) -> Path:
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[: rows + 1]))
    return dst


def chain_config(cluster, tmp_path: Path, inputs: Path, *overrides: str) -> Path:
    task = {"name": "sst2", "kind": "classification", "train": str(sst2_slice(SST2 / "train.tsv", tmp_path / "tr.tsv",
                                                                                200)),
            "eval": str(sst2_slice(SST2 / "dev.tsv", tmp_path / "dev.tsv", 60)), "text_key": "sentence",
            "eval_text_key": "content", "label_key": "label", "max_steps": 6, "micro_batch_size": 8,
            "eval_every": 3}
    return write_yaml(tmp_path / "chain.yaml", [
        f"workdir={tmp_path / 'w'}", f"data.inputs=[{inputs}]", "executor=slurm",
        # Fast filters only: Shakespeare's verse is not web text, and the point here is the chain.
        "prep.tasks=1", "prep.workers=1", "prep.filters.gopher_quality=false", "prep.filters.c4_quality=false",
        "prep.filters.fineweb_quality=false", "prep.filters.language=false", "prep.filters.gopher_repetition=false",
        "prep.dedup.minhash=false", "tokenizer.vocab_size=300", "shards.val_fraction=0.15", "shards.tasks=1",
        "shards.workers=1", *TRAIN, "train.max_steps=6", f"finetune.tasks=[{json.dumps(task)}]",
        *slurm_keys(cluster, 1), *overrides])  # one node: the 2-node case is the test above


def submitted_jobs(out: str) -> dict[str, str]:
    return dict(re.findall(r"^\[submit\] (\w+): job (\d+)", out, re.MULTILINE))


@pytest.mark.slow
def test_whole_chain_through_submit(slurm_cluster, tmp_path: Path) -> None:
    # prep and shard as datatrove job arrays, submitted from their stage's job (slurm.data_arrays)
    inputs = shakespeare_jsonl(tmp_path / "plays.jsonl")
    config = chain_config(slurm_cluster, tmp_path, inputs, "slurm.data_arrays=true")
    dry = scratchgpt("submit", str(config), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and dry.stdout.count("#!/bin/bash") == 5, dry.stderr
    assert not (tmp_path / "w" / "slurm").exists()  # a dry run writes and submits nothing

    result = scratchgpt("submit", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = submitted_jobs(result.stdout)
    assert list(jobs) == ["prep", "tokenizer", "shard", "pretrain", "finetune"], result.stdout
    record = json.loads((tmp_path / "w" / "slurm" / "jobs.json").read_text())
    assert {stage: entry["job_id"] for stage, entry in record["stages"].items()} == jobs
    twice = scratchgpt("submit", str(config), cwd=tmp_path)  # the chain is still queued: no second copy of it
    assert twice.returncode == 2 and "still queued" in twice.stderr and f"finetune (job {jobs['finetune']}" in \
        twice.stderr, twice.stderr
    for stage, job_id in jobs.items():
        state = slurm_cluster.wait(job_id, timeout=240)
        log = job_log(tmp_path / "w", stage, job_id)
        assert state["JobState"] == "COMPLETED", f"{stage}: {state}\n{log.read_text()[-3000:] if log.exists() else ''}"
        assert log.is_file() and f"[slurm] {stage}" in log.read_text()
    for stage, step in (("prep", "filter"), ("shard", "docs")):  # the arrays' own job logs
        assert "submitted" in job_log(tmp_path / "w", stage, jobs[stage]).read_text()
        assert list((tmp_path / "w" / stage / "logs" / step / "slurm_logs").glob("*.out")), (stage, step)
    status = scratchgpt("status", str(tmp_path / "w"))
    assert status.returncode == 0, status.stdout + status.stderr
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [[s, "complete"] for s in jobs], status.stdout
    _, runs = mlflow_runs(tmp_path / "w")
    assert {r.data.tags.get("stage") for r in runs} >= set(jobs)
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("stage") in jobs)

    again = scratchgpt("submit", str(config), cwd=tmp_path)  # everything complete: nothing to submit
    assert again.returncode == 0 and "nothing to submit" in again.stdout and not submitted_jobs(again.stdout)


def test_a_failing_stage_cancels_its_dependents_and_status_names_it(slurm_cluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "text": "fine"}\n{"id": "2", "text": broken}\n')
    config = chain_config(slurm_cluster, tmp_path, bad, "data.strict=true")
    result = scratchgpt("submit", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = submitted_jobs(result.stdout)
    assert slurm_cluster.wait(jobs["prep"], timeout=120)["JobState"] == "FAILED"
    for stage in ("tokenizer", "shard", "pretrain", "finetune"):
        state = slurm_cluster.wait(jobs[stage], timeout=60)
        assert (state["JobState"], state["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), (stage, state)
    status = scratchgpt("status", str(tmp_path / "w"))
    assert status.returncode == 1, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    prep_log = job_log(tmp_path / "w", "prep", jobs["prep"])
    assert lines[0].split()[:4] == ["prep", "failed", "job", jobs["prep"]], status.stdout
    assert lines[1].strip() == f"log: {prep_log}", status.stdout
    assert f"{bad}:2: malformed JSON" in prep_log.read_text()  # the log says what was wrong, and where
    for stage in ("tokenizer", "shard", "pretrain", "finetune"):
        row = next(line for line in lines if line.startswith(stage))
        assert row.split()[1] == "cancelled" and "upstream stage failed" in row, status.stdout
    assert len(lines) == 6  # one log line, for the stage that ran: the cancelled jobs never started


def test_status_says_when_slurm_has_forgotten_a_job(slurm_cluster, tmp_path: Path) -> None:
    from pipeline.slurm.submit import prepare

    config = write_yaml(tmp_path / "c.yaml", [f"workdir={tmp_path / 'w'}", f"data.inputs=[{tmp_path / 'c.yaml'}]"])
    base = prepare(load_config(config))
    # a job id this cluster never had: as after MinJobAge, when Slurm drops finished jobs
    (base / "jobs.json").write_text(json.dumps({"config": str(base / "config.yaml"), "stages": {
        "prep": {"job_id": "987654", "log": str(base / "logs" / "scratchgpt-prep-987654.out")}}}))
    status = scratchgpt("status", str(tmp_path / "w"))
    first = status.stdout.splitlines()[0]
    assert first.split()[:4] == ["prep", "unknown", "job", "987654"] and "no longer knows" in first, status.stdout
