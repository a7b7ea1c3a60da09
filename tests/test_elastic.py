"""Elastic resume on real DeepSpeed (fp32, CPU, gloo): a run stopped by SIGTERM on 2 processes continues on 1,
and one stopped on 1 continues on 2, with the losses of an unbroken run; ZeRO-3 and ZeRO-2. The global batch
stays fixed through `train.global_batch_size`. Two-process runs are real process groups started with
torch.multiprocessing; one-process runs happen in this process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import TINY, build_workdir, copy_inputs, copy_workdir

from pipeline.cli import leave_process_group
from pipeline.config import ConfigError, load_config
from pipeline.stages.pretrain import build
from training import checkpoint, elastic
from training.config import TrainConfig
from training.engine import EngineError
from training.export import export_checkpoint

# The tiny model with 8 sequences per step whatever the world size (grad_accum follows from it).
ELASTIC = [*TINY, "train.global_batch_size=8"]


def elastic_config(workdir: Path, *overrides: str):
    return load_config(None, [f"workdir={workdir}", "tokenizer.vocab_size=300", "shards.val_fraction=0.15",
                              *ELASTIC, *overrides])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("base")
    build_workdir(workdir)
    return workdir


def fresh(base: Path, tmp_path: Path, name: str) -> Path:
    workdir = tmp_path / name
    copy_inputs(base, workdir)
    return workdir


def _stop_at(trainer, step: int) -> None:
    """SIGTERM this process after `step`: the loop finishes the next step, checkpoints and returns."""
    def hook(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.on_step = hook


def _worker(rank: int, world: int, port: int, workdir: str, overrides: list[str], stop_after: int,
            out: str) -> None:
    # Both ranks join the store the parent holds, as torchrun's workers join their agent's.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    trainer = build(elastic_config(Path(workdir), *overrides)).trainer
    tag = trainer.resume()
    if stop_after and rank == 0:  # one rank's signal stops all: the flag rides on the loss all-reduce
        _stop_at(trainer, stop_after)
    result = trainer.run()
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": result.losses, "step": result.step, "reason": result.reason,
                                         "resumed": tag, "how": trainer.resumed_how,
                                         "grad_accum": trainer.train_cfg.grad_accum}))
    leave_process_group(0)  # together, as the CLI does: a rank that leaves first can abort the other


def two_processes(workdir: Path, *overrides: str, stop_after: int = 0) -> dict:
    """Train (or resume) in a real 2-process gloo group; rank 0's result.

    This process binds the group's store before the ranks start: a port picked here and released could be taken
    by the other test worker before rank 0 bound it."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = workdir.parent / f"{workdir.name}-{os.urandom(4).hex()}.json"
    mp.start_processes(_worker, args=(2, store.port, str(workdir), list(overrides), stop_after, str(out)), nprocs=2,
                       start_method="spawn")
    return json.loads(out.read_text())


def one_process(workdir: Path, *overrides: str, stop_after: int = 0):
    trainer = build(elastic_config(workdir, *overrides)).trainer
    tag = trainer.resume()
    if stop_after:
        _stop_at(trainer, stop_after)
    return trainer, tag, trainer.run()


@dataclass(frozen=True)
class Run:
    workdir: Path  # its checkpoints: step_00000004 and step_00000008, written by 2 processes
    losses: list[float]


@pytest.fixture(scope="module")
def unbroken(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Run]:
    """8 uninterrupted steps on 2 processes, per ZeRO stage. Tests that change a run's checkpoints copy it."""
    runs = {}
    for stage in (3, 2):
        workdir = fresh(base, tmp_path_factory.mktemp("unbroken"), f"zero{stage}")
        result = two_processes(workdir, f"train.zero_stage={stage}")
        assert result["step"] == 8 and result["grad_accum"] == 1
        runs[stage] = Run(workdir, result["losses"])
    return runs


@pytest.mark.parametrize("stage", [3, 2])
def test_two_processes_stopped_resume_on_one_with_the_unbroken_losses(
        base: Path, tmp_path: Path, unbroken: dict[int, Run], stage: int) -> None:
    workdir = fresh(base, tmp_path, "two-to-one")
    part = two_processes(workdir, f"train.zero_stage={stage}", stop_after=3)
    assert part["reason"] == "signal" and part["step"] == 4
    tag_dir = workdir / "pretrain" / "checkpoints" / "step_00000004"
    assert json.loads((tag_dir / checkpoint.META).read_text())["world_size"] == 2
    assert not elastic.is_converted(tag_dir)

    trainer, tag, rest = one_process(workdir, f"train.zero_stage={stage}")
    assert tag == "step_00000004" and rest.step == 8 and len(rest.losses) == 4
    assert trainer.train_cfg.grad_accum == 2  # 8 = 4 sequences x 2 micro-steps x 1 process
    assert trainer.resumed_how == "(written by 2 processes) on 1 process"
    assert elastic.is_converted(tag_dir)
    assert part["losses"] == pytest.approx(unbroken[stage].losses[:4], rel=1e-6)
    assert rest.losses == pytest.approx(unbroken[stage].losses[4:], rel=1e-6)
    groups = trainer.eng.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # biases and norms still without decay


def test_one_process_stopped_resumes_on_two_with_the_unbroken_losses(
        base: Path, tmp_path: Path, unbroken: dict[int, Run]) -> None:
    workdir = fresh(base, tmp_path, "one-to-two")
    _, _, part = one_process(workdir, stop_after=3)
    assert part.reason == "signal" and part.step == 4
    rest = two_processes(workdir)
    assert rest["resumed"] == "step_00000004" and rest["how"] == "(written by 1 process) on 2 processes"
    assert rest["grad_accum"] == 1
    assert part.losses + rest["losses"] == pytest.approx(unbroken[3].losses, rel=1e-6)


def test_a_converted_checkpoint_is_not_converted_again_and_exports(unbroken: dict[int, Run], tmp_path: Path) -> None:
    workdir = copy_workdir(unbroken[3].workdir, tmp_path)
    ckpt = workdir / "pretrain" / "checkpoints"
    tag_dir = ckpt / "step_00000008"
    assert elastic.prepare(tag_dir, is_main=True) is True
    done = elastic.universal_dir(tag_dir) / elastic.DONE
    stamp = done.stat().st_mtime_ns
    assert elastic.prepare(tag_dir, is_main=True) is False  # the second resume converts nothing
    trainer, tag, _ = one_process(workdir)  # a resume at the end: loads, trains nothing
    assert tag == "step_00000008" and done.stat().st_mtime_ns == stamp
    assert not list(tag_dir.glob(f".{elastic.UNIVERSAL}.tmp.*"))

    # A conversion killed half-way left its temporary folder and no DONE file: the next one redoes it.
    shutil.rmtree(elastic.universal_dir(tag_dir))
    dead = tag_dir / f".{elastic.UNIVERSAL}.tmp.{socket.gethostname()}.999999999"
    dead.mkdir()
    (dead / "half.pt").write_bytes(b"\0")
    assert elastic.prepare(tag_dir, is_main=True) is True
    assert elastic.is_converted(tag_dir) and not dead.exists()

    # Export reads the original partitions, whoever resumed from them: the same weights as the engine.
    weights, meta = checkpoint.full_state_dict(ckpt, "step_00000008")
    assert meta["world_size"] == 2
    engine = trainer.eng.engine
    for name, param in engine.module.named_parameters():
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            torch.testing.assert_close(weights[name], param.detach().float(), rtol=1e-6, atol=1e-7)
    assert (export_checkpoint(ckpt, tmp_path / "hf", workdir / "tokenizer", "step_00000008") / "config.json").is_file()


def test_a_changed_global_batch_is_refused_on_another_world_size(unbroken: dict[int, Run], tmp_path: Path) -> None:
    workdir = copy_workdir(unbroken[3].workdir, tmp_path)
    trainer = build(elastic_config(workdir, "train.global_batch_size=4")).trainer
    with pytest.raises(checkpoint.CheckpointError, match="global batch of 8 .* this run has 4 .*global_batch_size"):
        trainer.resume()


def test_grad_accum_follows_the_world_size() -> None:
    train = TrainConfig(micro_batch_size=4, global_batch_size=24)
    assert [elastic.batch_sizes(train, w).grad_accum for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    with pytest.raises(EngineError, match=r"world size in \[1, 2, 3, 6\]; with 4 processes use micro_batch_size "
                                          r"in \[1, 2, 3, 6\]"):
        elastic.batch_sizes(train, 4)
    assert elastic.batch_sizes(TrainConfig(grad_accum=3), 2).grad_accum == 3  # no global batch: as configured


def test_global_batch_and_grad_accum_together_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="global_batch_size or train.grad_accum, not both"):
        load_config(None, [f"workdir={tmp_path}", "train.global_batch_size=8", "train.grad_accum=2"])
    # A config snapshot (scratchgpt submit) writes every key back, grad_accum 1 included: still valid.
    train = load_config(None, [f"workdir={tmp_path}", "train.grad_accum=1", "train.global_batch_size=8",
                               "train.micro_batch_size=2"]).train
    assert elastic.batch_sizes(train, 2).grad_accum == 2

