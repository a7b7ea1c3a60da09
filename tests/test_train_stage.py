"""`scratchgpt pretrain` and `scratchgpt export` as users run them: one process, two under torchrun (ZeRO-3 over
gloo), SIGTERM and resume, and what lands in the MLflow store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import TINY, build_workdir, cli_env, copy_inputs, torchrun_cli, write_yaml

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("base")
    build_workdir(workdir)
    return workdir


def write_config(base: Path, workdir: Path, *overrides: str) -> Path:
    """A YAML file with the tiny model, and the workdir holding a copy of base's tokenizer and shards."""
    copy_inputs(base, workdir)
    return write_yaml(workdir.parent / f"{workdir.name}.yaml",
                      [f"workdir={workdir}", "tokenizer.vocab_size=300", "tracking.experiment=t", *TINY, *overrides])


def scratchgpt(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "scratchgpt"), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env())


def mlflow_run(workdir: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("t")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "pretrain"]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def losses(client, run) -> list[float]:
    history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    return [m.value for m in history]


@pytest.fixture(scope="module")
def one_process_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`scratchgpt pretrain` in one process, 8 steps of 2 micro-batches of 4 sequences."""
    one = tmp_path_factory.mktemp("runs") / "one"
    result = scratchgpt("pretrain", str(write_config(base, one, "train.grad_accum=2")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample: ROMEO:" in result.stdout
    return one


def test_the_run_is_tracked_in_mlflow(one_process_run: Path, tmp_path: Path) -> None:
    from dataprep.shards import manifest_sha256

    one = one_process_run
    client, run = mlflow_run(one)
    params, tags = run.data.params, run.data.tags
    # the whole config, the model size and the world size
    assert params["model.n_layer"] == "2" and params["train.lr"] == "0.003" and params["tokenizer.vocab_size"] == "300"
    assert int(params["n_params"]) > 30_000 and params["precision"] == "fp32" and params["world_size"] == "1"
    # lineage: the code, the config, the data
    assert tags["shard_manifest_sha256"] == manifest_sha256(one / "shards")
    assert len(tags["git_commit"]) >= 7 and len(tags["config_hash"]) == 16
    # metrics by step
    curve = losses(client, run)
    assert len(curve) == 8 and curve[-1] < curve[0]
    for key in ("lr", "grad_norm", "tokens_per_sec", "mfu", "step_time"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 9)), key
    for key in ("val_loss", "val_bpb", "val_ppl"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [4, 8], key
    assert 0 < run.data.metrics["tracking_fraction"] < 1  # measured; the < 2% claim is tested with a realistic rate
    # artifacts: DeepSpeed JSON, tokenizer, samples at each eval, the export
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"deepspeed_config.json", "tokenizer", "samples", "export"} <= artifacts
    samples = {f.path for f in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_00000004.txt", "samples/step_00000008.txt", "samples/final.txt"} <= samples
    exported = {f.path for f in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/model.safetensors", "export/config.json", "export/tokenizer.json"} <= exported
    ds_json = json.loads(Path(client.download_artifacts(run.info.run_id, "deepspeed_config.json", str(tmp_path)))
                         .read_text())
    assert ds_json["zero_optimization"]["stage"] == 3 and ds_json["gradient_accumulation_steps"] == 2
    assert json.loads((one / "pretrain" / "_COMPLETE.json").read_text())["summary"]["steps"] == 8


def test_export_command_writes_a_folder_transformers_loads(one_process_run: Path, tmp_path: Path) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from training.export import load_gpt

    out = tmp_path / "hf"
    result = scratchgpt("export", str(one_process_run / "pretrain" / "checkpoints"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours, _ = load_gpt(one_process_run / "pretrain" / "export")  # the stage's own export of the same checkpoint
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids)[0], rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").is_file()

    missing = scratchgpt("export", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(base: Path, one_process_run: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    cfg_two = write_config(base, two, "train.grad_accum=1")  # same global batch: 2 ranks x 4 vs 1 rank x 4 x 2
    dist = subprocess.run(torchrun_cli("pretrain", str(cfg_two)), capture_output=True, text=True, timeout=240,
                          env=cli_env())
    assert dist.returncode == 0, dist.stderr[-3000:]
    client, run = mlflow_run(one_process_run)
    client_two, run_two = mlflow_run(two)
    assert run_two.data.params["world_size"] == "2"
    assert losses(client_two, run_two) == pytest.approx(losses(client, run), rel=1e-4)
    # the two ranks' ZeRO-3 partitions join into the same weights as the single process's
    from training.checkpoint import full_state_dict

    one_weights, _ = full_state_dict(one_process_run / "pretrain" / "checkpoints")
    two_weights, meta = full_state_dict(two / "pretrain" / "checkpoints")
    assert meta["world_size"] == 2
    for name, value in one_weights.items():
        assert two_weights[name].shape == value.shape
        assert (two_weights[name] - value).abs().max().item() < 1e-4, name


def test_sigterm_checkpoints_exits_0_and_the_rerun_resumes(base: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    config = write_config(base, workdir, "train.max_steps=40", "train.eval_every=100000",
                          "train.checkpoint_every=100000")
    proc = subprocess.Popen([str(VENV_BIN / "scratchgpt"), "pretrain", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[pretrain] step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal after step" in out
    ckpt = workdir / "pretrain" / "checkpoints"
    tag = (ckpt / "latest").read_text()
    step = json.loads((ckpt / tag / "scratchgpt.json").read_text())["step"]
    assert 5 <= step < 40
    assert not (workdir / "pretrain" / "_COMPLETE.json").exists()  # not done: a rerun must resume

    again = scratchgpt("pretrain", str(config))  # the same command: a changed config would start afresh
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt / tag} at step {step}" in again.stdout, out + again.stdout + again.stderr[-3000:]
    client, run = mlflow_run(workdir)  # the same MLflow run, continued
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == list(range(1, 41))
    assert json.loads((workdir / "pretrain" / "_COMPLETE.json").read_text())["summary"]["steps"] == 40
    assert run.info.status == "FINISHED"
