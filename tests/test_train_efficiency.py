"""Muon, the WSD schedule and torch.compile on DeepSpeed ZeRO-3 (gloo, fp32): which weights Muon updates, exact
resume, export parity, extending a WSD run, and two processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, build_workdir, cli_env, copy_inputs, tiny_config, torchrun_cli, write_yaml

from pipeline.config import load_config
from pipeline.core.identity import compute
from pipeline.stages.pretrain import build
from training import checkpoint
from training.config import TrainConfig
from training.export import export_checkpoint
from training.model import GPT, GPTConfig
from training.optim import muon_momentum_at, muon_split
from training.schedule import ScheduleError, lr_at


def resume_hash(cfg, name: str) -> str:
    return compute(cfg, name).resume


def stage_hash(cfg, name: str) -> str:
    return compute(cfg, name).hash

MUON_WSD = ["train.optimizer=muon", "train.muon_lr=0.02", "train.muon_momentum_warmup=4", "train.schedule=wsd",
            "train.decay_fraction=0.5"]
HIDDEN = {f"h.{i}.{name}.weight" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("base")
    build_workdir(workdir)
    return workdir


def workdir_from(base: Path, tmp_path: Path, name: str) -> Path:
    workdir = tmp_path / name
    copy_inputs(base, workdir)
    return workdir


# ---------------------------------------------------------------- no engine


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_by_name() -> None:
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    split = muon_split(model)
    assert {name for name, muon in split.items() if muon} == HIDDEN
    # DeepSpeed's own rule ("embed"/"lm_head" not in the name) would put these two on Muon.
    assert split["wte.weight"] is False and split["wpe.weight"] is False
    assert "lm_head.weight" not in split  # tied to wte: one tensor, on AdamW
    assert not any(split[n] for n in split if n.endswith(".bias") or ".ln_" in n or n.startswith("ln_f"))


def test_muon_momentum_warms_up_and_deepspeed_json_fits_muon() -> None:
    from training.engine import deepspeed_config

    train = TrainConfig(optimizer="muon", muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup=10)
    assert [round(muon_momentum_at(s, train), 3) for s in (0, 5, 10, 50)] == [0.85, 0.9, 0.95, 0.95]
    cfg = deepspeed_config(train, "fp32", world_size=2)
    assert cfg["zero_optimization"]["reduce_scatter"] is False  # DeepSpeed's ZeRO-3 Muon refuses reduce-scatter
    assert cfg["gradient_clipping"] == 0.0  # ZeRO clips by the norm of Muon's updates: it would shrink them
    assert "reduce_scatter" not in deepspeed_config(TrainConfig(), "fp32", 2)["zero_optimization"]


def test_muon_ns_steps_reach_deepspeeds_update() -> None:
    from deepspeed.runtime.zero.muon import original_muon

    from training.optim import install_muon_update

    grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    updates = {}
    for steps in (1, 5):
        install_muon_update(steps, cuda=False)
        updates[steps] = original_muon.muon_update(grad.clone(), torch.zeros_like(grad), beta=0.9)
    # More iterations push the singular values nearer 1 (the update towards an orthogonal matrix x sqrt(3)).
    spread = {k: torch.linalg.svdvals(u / 3**0.5) for k, u in updates.items()}
    assert (spread[5] - 1).abs().mean() < (spread[1] - 1).abs().mean()
    assert not torch.allclose(updates[1], updates[5])


def test_wsd_holds_the_peak_then_decays_over_the_last_share() -> None:
    wsd = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "max_steps": 100, "schedule": "wsd", "decay_fraction": 0.2}
    rates = [lr_at(s, **wsd) for s in range(101)]
    assert rates[9] == rates[50] == rates[80] == pytest.approx(1.0)
    assert rates[90] == pytest.approx(0.1 + 0.9 * 0.5)  # linear: halfway through the decay
    assert rates[100] == pytest.approx(0.1)
    assert lr_at(90, **wsd, decay_shape="1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - 0.5**0.5))
    # Under a budget the decay starts when the remaining budget is the decay's share, whatever the step.
    assert lr_at(20, **wsd, budget_spent=0.79) == pytest.approx(1.0)
    assert lr_at(20, **wsd, budget_spent=0.9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(20, **wsd, budget_spent=1.0) == pytest.approx(0.1)


def test_a_wsd_runs_max_steps_may_change_without_clearing_its_checkpoints(tmp_path: Path) -> None:
    def cfg(*overrides: str):
        return load_config(None, [f"workdir={tmp_path}", *overrides])

    assert resume_hash(cfg("train.schedule=wsd", "train.max_steps=100"), "pretrain") == \
        resume_hash(cfg("train.schedule=wsd", "train.max_steps=200"), "pretrain")
    # ... but the completion marker still sees the change, so the longer run runs.
    assert stage_hash(cfg("train.schedule=wsd", "train.max_steps=100"), "pretrain") != \
        stage_hash(cfg("train.schedule=wsd", "train.max_steps=200"), "pretrain")
    assert resume_hash(cfg("train.max_steps=100"), "pretrain") != resume_hash(cfg("train.max_steps=200"), "pretrain")
    assert resume_hash(cfg("train.schedule=wsd", "train.lr=0.01"), "pretrain") != \
        resume_hash(cfg("train.schedule=wsd", "train.lr=0.02"), "pretrain")


# ---------------------------------------------------------------- one process, ZeRO-3


def test_zero3_muon_keeps_our_split_and_orthogonalizes_out_by_in_matrices(base: Path, tmp_path: Path) -> None:
    from deepspeed.runtime.zero.muon import original_muon

    setup = build(tiny_config(workdir_from(base, tmp_path, "split"), *MUON_WSD, "train.max_steps=2"))
    flags = {name: p.use_muon for name, p in setup.eng.engine.module.named_parameters()}
    assert {name for name, muon in flags.items() if muon} == HIDDEN  # deepspeed.initialize did not re-tag them
    shapes: list[tuple[int, ...]] = []
    update = original_muon.muon_update

    def spy(grad: torch.Tensor, *args, **kwargs):
        shapes.append(tuple(grad.shape))
        return update(grad, *args, **kwargs)

    original_muon.muon_update = spy
    try:
        setup.trainer.run()
    finally:
        original_muon.muon_update = update
    # nn.Linear's out x in: Muon's sqrt(max(1, rows/cols)) scale reads rows as the output width (c_fc: 4C x C).
    n = 32
    assert sorted(set(shapes)) == sorted({(3 * n, n), (n, n), (4 * n, n), (n, 4 * n)})
    assert len(shapes) == 2 * len(HIDDEN)  # every hidden matrix, once per step


def test_muon_wsd_stopped_and_resumed_equals_uninterrupted_and_exports(base: Path, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    straight = build(tiny_config(workdir_from(base, tmp_path, "straight"), *MUON_WSD))
    full = straight.trainer.run()
    cfg = tiny_config(workdir_from(base, tmp_path, "stopped"), *MUON_WSD)
    first = build(cfg).trainer

    def sigterm_at_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first.on_step = sigterm_at_2
    part = first.run()
    assert part.reason == "signal" and part.step == 3  # mid momentum warm-up, before the decay
    second = build(cfg).trainer
    assert second.resume() == "step_00000003"
    rest = second.run()
    assert part.losses + rest.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-6)
    weights_a, _ = checkpoint.full_state_dict(straight.trainer.ckpt_dir)
    weights_b, _ = checkpoint.full_state_dict(second.ckpt_dir)
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-6, atol=1e-7)

    out = export_checkpoint(straight.paths["checkpoints"], tmp_path / "hf", None)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    engine = straight.eng.engine
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits, engine(ids)[0],
                                   rtol=1e-4, atol=1e-4)


def test_a_wsd_run_extended_from_its_stable_phase_equals_the_longer_run(base: Path, tmp_path: Path) -> None:
    # decay_fraction 0.5: 8 steps decay from step 4, 12 from step 6. Checkpoints every 2 steps; the
    # loop adds one at step 5, the last stable state, and pruning keeps it.
    longer = build(tiny_config(workdir_from(base, tmp_path, "longer"), *MUON_WSD, "train.max_steps=12",
                               "train.checkpoint_every=2")).trainer.run()
    workdir = workdir_from(base, tmp_path, "extended")
    short = build(tiny_config(workdir, *MUON_WSD, "train.checkpoint_every=2")).trainer
    short.run()
    ckpt = short.ckpt_dir
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000005", "step_00000006", "step_00000008"]
    assert checkpoint.read_meta(ckpt, "step_00000005")["stable_phase"] is True
    assert checkpoint.read_meta(ckpt, "step_00000008")["stable_phase"] is False

    too_short = build(tiny_config(workdir, *MUON_WSD, "train.max_steps=6")).trainer  # decays from step 3
    with pytest.raises(ScheduleError, match="max_steps changed from 8 to 6.*no stable-phase checkpoint"):
        too_short.resume()

    extended = build(tiny_config(workdir, *MUON_WSD, "train.max_steps=12", "train.checkpoint_every=2")).trainer
    assert extended.resume() == "step_00000005"
    assert checkpoint.latest_tag(ckpt) == "step_00000005" and not (ckpt / "step_00000008").exists()
    rest = extended.run()
    assert rest.step == 12
    assert rest.losses == pytest.approx(longer.losses[5:], rel=1e-6, abs=1e-6)


@pytest.mark.slow  # inductor's first C++ builds: the compiled run took ~110 s cold on the loaded 2 cores, 27 s warm
def test_compile_gives_the_eager_losses(base: Path, tmp_path: Path) -> None:
    eager = build(tiny_config(workdir_from(base, tmp_path, "eager"), "train.max_steps=3")).trainer.run()
    started = time.perf_counter()
    compiled = build(tiny_config(workdir_from(base, tmp_path, "compiled"), "train.max_steps=3",
                                 "train.compile=true")).trainer.run()
    print(f"compiled run: {time.perf_counter() - started:.1f} s")
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


# ---------------------------------------------------------------- two processes


def _torchrun(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cli("pretrain", str(config)), capture_output=True, text=True, timeout=300,
                          env=cli_env())


@pytest.mark.slow
def test_two_processes_extend_a_muon_wsd_run_through_the_cli_exactly(base: Path, tmp_path: Path) -> None:
    """`scratchgpt pretrain` under torchrun: 8 steps, then the same config with max_steps=12 resumes (the
    stage keeps its checkpoints) from the stable phase, and ends with the weights of a 12-step run."""
    def config(workdir: Path, steps: int) -> Path:
        if not workdir.exists():
            copy_inputs(base, workdir)
        return write_yaml(tmp_path / f"{workdir.name}-{steps}.yaml",
                          [f"workdir={workdir}", "tokenizer.vocab_size=300", "tracking.experiment=t", *TINY,
                           *MUON_WSD, f"train.max_steps={steps}", "train.checkpoint_every=2"])

    for workdir, steps in ((tmp_path / "longer", 12), (tmp_path / "extended", 8), (tmp_path / "extended", 12)):
        done = _torchrun(config(workdir, steps))
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "step_00000005 at step 5" in done.stdout, done.stdout[-2000:]
    marker = json.loads((tmp_path / "extended" / "pretrain" / "_COMPLETE.json").read_text())
    assert marker["summary"]["steps"] == 12
    weights_a, meta = checkpoint.full_state_dict(tmp_path / "longer" / "pretrain" / "checkpoints")
    weights_b, _ = checkpoint.full_state_dict(tmp_path / "extended" / "pretrain" / "checkpoints")
    assert meta["world_size"] == 2
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-6)
