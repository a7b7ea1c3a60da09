"""The training loop in this process on DeepSpeed ZeRO-3 (world size 1, gloo): exact resume, NaN stop,
refused resumes, export parity with transformers, missing inputs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import build_workdir, copy_inputs, tiny_config

from pipeline.config import ConfigError
from pipeline.stages.pretrain import build
from training import checkpoint
from training.export import export_checkpoint
from training.loop import NonFiniteLoss


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("base")
    build_workdir(workdir)
    return workdir


def workdir_from(base: Path, tmp_path: Path, name: str) -> Path:
    workdir = tmp_path / name
    copy_inputs(base, workdir)
    return workdir


def test_stopped_by_sigterm_and_resumed_equals_uninterrupted(base: Path, tmp_path: Path) -> None:
    straight = build(tiny_config(workdir_from(base, tmp_path, "straight"))).trainer
    full = straight.run()
    assert full.reason == "max_steps" and full.step == 8

    cfg = tiny_config(workdir_from(base, tmp_path, "stopped"))
    first = build(cfg).trainer

    def sigterm_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the loop finishes the next step and stops

    first.on_step = sigterm_at_3
    before = signal.getsignal(signal.SIGTERM)  # another fixture (the Slurm test bed's) may have one installed
    part = first.run()
    assert part.reason == "signal" and part.step == 4
    assert checkpoint.latest_tag(first.ckpt_dir) == "step_00000004"
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is removed after the run

    second = build(cfg).trainer
    assert second.resume() == "step_00000004" and second.step == 4
    rest = second.run()
    assert rest.step == 8
    assert part.losses + rest.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-6)
    assert [e["val_loss"] for e in rest.evals][-1] == pytest.approx(full.evals[-1]["val_loss"], rel=1e-6)
    weights_a, _ = checkpoint.full_state_dict(straight.ckpt_dir)
    weights_b, _ = checkpoint.full_state_dict(second.ckpt_dir)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-6, atol=1e-7)


def test_export_from_zero3_checkpoint_matches_transformers_and_the_engine(base: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    workdir = workdir_from(base, tmp_path, "export")
    setup = build(tiny_config(workdir, "train.max_steps=4"))
    setup.trainer.run()
    out = export_checkpoint(setup.paths["checkpoints"], tmp_path / "hf", workdir / "tokenizer")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("ROMEO: What say you?")["input_ids"]])
    engine = setup.eng.engine
    engine.eval()
    with torch.no_grad():
        ours, _ = engine(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_time_budget_anneals_the_rate_and_counts_across_resumes(base: Path, tmp_path: Path) -> None:
    budget_s = 4.0
    cfg = tiny_config(workdir_from(base, tmp_path, "budget"), "train.max_steps=1000000",
                      f"train.max_minutes={budget_s / 60}", "train.eval_every=1000000",
                      "train.checkpoint_every=1000000", "train.log_every=1000000")
    first = build(cfg).trainer

    def sigterm_past_60_percent(step: int) -> None:
        if first.budget_used_s > 0.6 * budget_s and not stopping:
            stopping.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    stopping: list[int] = []
    first.on_step = sigterm_past_60_percent
    part = first.run()
    assert part.reason == "signal"
    rate_at_stop = first.eng.optimizer.param_groups[0]["lr"]
    # Far from max_steps, so only the budget can have lowered the rate this much below its peak.
    assert rate_at_stop < cfg.train.min_lr + 0.6 * (cfg.train.lr - cfg.train.min_lr)

    second = build(cfg).trainer
    second.resume()
    assert second.budget_used_s == pytest.approx(first.budget_used_s)  # carried in the checkpoint
    rest = second.run()
    assert rest.reason == "max_minutes"
    assert rest.train_seconds < 0.7 * budget_s  # only the rest of the budget, not a fresh one
    final_rate = second.eng.optimizer.param_groups[0]["lr"]
    assert final_rate < cfg.train.min_lr + 0.1 * (cfg.train.lr - cfg.train.min_lr)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(base: Path, tmp_path: Path) -> None:
    cfg = tiny_config(workdir_from(base, tmp_path, "nan"), "train.lr=1.0e+30", "train.warmup_steps=0",
                      "train.grad_clip=0", "train.max_steps=50", "train.checkpoint_every=1000")
    trainer = build(cfg).trainer
    with pytest.raises(NonFiniteLoss) as err:
        trainer.run()
    bad = trainer.step + 1
    assert f"at step {bad}" in str(err.value) and "no checkpoint holds a good state" in str(err.value)
    # The state the bad step started from gave the non-finite loss: it is not saved as "last good".
    assert checkpoint.latest_tag(trainer.ckpt_dir) is None
    assert not list(trainer.ckpt_dir.glob("step_*"))  # nothing was saved: checkpoint_every is 1000


def test_refused_resumes_fail_before_loading(base: Path, tmp_path: Path) -> None:
    workdir = workdir_from(base, tmp_path, "refuse")
    build(tiny_config(workdir, "train.max_steps=2")).trainer.run()
    tag_dir = workdir / "pretrain" / "checkpoints" / "step_00000002"
    for name in ("model.n_layer=3", "model.block_size=64"):
        trainer = build(tiny_config(workdir, name)).trainer
        with pytest.raises(checkpoint.CheckpointError, match="different model shape|larger than the position table"):
            trainer.resume()

    optim = next(tag_dir.glob("*optim_states.pt"))
    optim.write_bytes(b"\0" * optim.stat().st_size)  # same size, garbage inside
    trainer = build(tiny_config(workdir)).trainer
    with pytest.raises(checkpoint.CheckpointError, match="optim_states.pt is damaged: sha256"):
        trainer.resume()
    optim.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="optim_states.pt is missing"):
        trainer.resume()


def test_no_shards_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no token shards .*run `scratchgpt shard` first"):
        build(tiny_config(tmp_path / "empty"))


def test_no_tokenizer_is_a_clear_error(base: Path, tmp_path: Path) -> None:
    import shutil

    workdir = workdir_from(base, tmp_path, "no-tokenizer")
    shutil.rmtree(workdir / "tokenizer")
    with pytest.raises(ConfigError, match="no tokenizer in .*run `scratchgpt tokenizer CONFIG` first"):
        build(tiny_config(workdir))


@pytest.mark.parametrize("stage", [0, 2])
def test_other_zero_stages_train_and_export(base: Path, tmp_path: Path, stage: int) -> None:
    from transformers import GPT2LMHeadModel

    workdir = workdir_from(base, tmp_path, f"stage{stage}")
    setup = build(tiny_config(workdir, "train.max_steps=2", f"train.zero_stage={stage}"))
    assert setup.eng.ds_config["zero_optimization"]["stage"] == stage
    result = setup.trainer.run()
    assert result.step == 2 and result.losses[1] < result.losses[0] + 0.5
    out = export_checkpoint(setup.paths["checkpoints"], tmp_path / "hf", workdir / "tokenizer")
    ids = torch.tensor([[5, 6, 7, 8]])
    setup.eng.engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits,
                                   setup.eng.engine(ids)[0], rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_losses(base: Path, tmp_path: Path) -> None:
    plain = build(tiny_config(workdir_from(base, tmp_path, "plain"), "train.max_steps=3")).trainer.run()
    recomputed = build(tiny_config(workdir_from(base, tmp_path, "ac"), "train.max_steps=3",
                                   "train.activation_checkpointing=true")).trainer.run()
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_a_lone_process_does_not_leak_its_rendezvous_into_child_processes(base: Path, tmp_path: Path) -> None:
    if "MASTER_PORT" in os.environ:
        pytest.skip("MASTER_PORT is set by whoever runs the tests")
    build(tiny_config(workdir_from(base, tmp_path, "env"), "train.max_steps=1"))
    assert "MASTER_PORT" not in os.environ and "RANK" not in os.environ  # a child scratchgpt would reuse them
