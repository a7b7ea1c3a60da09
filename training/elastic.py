"""Elastic resume: continue a run on another number of processes, with the same global batch.

Two parts:

- The global batch. `train.global_batch_size` fixes `micro_batch_size x grad_accum x world_size`;
  `grad_accum` follows from the world size the run gets. The loader's order is a pure function of
  (shards, seed, consumed samples) and every step takes the next global batch of that order, so a
  resume on N' processes draws the very samples N would have drawn.
- The optimizer state. A ZeRO checkpoint holds one partition per rank, loadable only by as many ranks.
  When the world size differs, rank 0 converts the checkpoint once with DeepSpeed's
  `ds_to_universal` (one file per parameter and state: fp32 weights, Adam moments) into
  `<tag>/universal/`, and every rank loads it with DeepSpeed's `checkpoint.load_universal`, which
  re-partitions for the current world size.

The conversion is written into a private temporary folder and renamed into place, so a reader sees a
whole conversion or none; one killed half-way leaves only a temporary folder, removed on the next try.
Two jobs racing on the same checkpoint each convert and the second rename loses harmlessly.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from training.checkpoint import CheckpointError, safe_load
from training.config import TrainConfig
from training.engine import EngineError
from training.launch import pid_alive

UNIVERSAL = "universal"  # folder inside a checkpoint's tag folder
DONE = "scratchgpt_universal.json"  # written last inside the conversion, before the rename


# ---------------------------------------------------------------- global batch


def batch_sizes(train: TrainConfig, world_size: int) -> TrainConfig:
    """The train config this world size runs with: `grad_accum` derived from `global_batch_size` when set."""
    target = train.global_batch_size
    if target is None:
        return train
    per_step = train.micro_batch_size * world_size
    if target % per_step:
        raise EngineError(_not_divisible(target, train.micro_batch_size, world_size))
    return train.model_copy(update={"grad_accum": target // per_step})


def _not_divisible(target: int, micro: int, world: int) -> str:
    worlds = [w for w in range(1, target // micro + 1) if target % (micro * w) == 0]
    micros = [m for m in range(1, target // world + 1) if target % (m * world) == 0] if target % world == 0 else []
    with_micro = f"with micro_batch_size {micro} it needs a world size in {worlds}" if worlds else (
        f"micro_batch_size {micro} does not divide it at all")
    with_world = (f"with {world} processes use micro_batch_size in {micros}" if micros
                  else f"{world} processes cannot split it")
    return (f"train.global_batch_size {target} is not divisible by micro_batch_size {micro} x world size {world}: "
            f"{with_micro}; {with_world}")


def check_same_batch(meta: dict[str, Any], ds_config: dict[str, Any], world_size: int, where: str) -> None:
    """A resume on another world size must keep the global batch, or it is not the same run."""
    saved = meta.get("global_batch")
    now = ds_config["train_batch_size"]
    if saved is None or saved == now:
        return
    raise CheckpointError(
        f"checkpoint {where} was trained with a global batch of {saved} sequences per step "
        f"({meta.get('world_size')} processes); this run has {now} (micro_batch_size "
        f"{ds_config['train_micro_batch_size_per_gpu']} x grad_accum {ds_config['gradient_accumulation_steps']} x "
        f"{world_size} processes). Set train.global_batch_size: {saved} so grad_accum follows the world size, "
        "or resume on the same number of processes"
    )


def resumed_how(meta: dict[str, Any], world_size: int) -> str:
    """For the resume line: `(written by 2 processes) on 1 process`."""
    def processes(n: Any) -> str:
        return f"{n} process" + ("" if n == 1 else "es")

    return f"(written by {processes(meta.get('world_size', '?'))}) on {processes(world_size)}"


# ---------------------------------------------------------------- universal checkpoints


def needs_universal(meta: dict[str, Any], world_size: int) -> bool:
    """A ZeRO checkpoint (stage >= 1) written by another number of processes: its partitions do not fit."""
    return meta.get("zero_stage", 0) > 0 and meta.get("world_size") != world_size


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir / UNIVERSAL


def is_converted(tag_dir: Path) -> bool:
    return (universal_dir(tag_dir) / DONE).is_file()


def convert(tag_dir: Path) -> bool:
    """Convert one checkpoint to DeepSpeed's universal format, once. Returns False when it already was.

    One process, no process group. The source files are first read with `safe_load` (tensors and
    plain containers only), because DeepSpeed's converter unpickles them without restriction.
    """
    import json

    tag_dir = Path(tag_dir)
    final = universal_dir(tag_dir)
    if is_converted(tag_dir):
        return False
    _remove_dead_attempts(tag_dir)
    sources = sorted(tag_dir.glob("*_states.pt"))
    if not sources:
        raise CheckpointError(f"checkpoint {tag_dir} has no DeepSpeed state files to convert")
    for path in sources:
        safe_load(path, mmap=True)  # raises CheckpointError naming the file
    tmp = tag_dir / f".{UNIVERSAL}.tmp.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            _run_ds_to_universal(tag_dir, tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = log.getvalue()[-1500:]
        raise CheckpointError(f"checkpoint {tag_dir} could not be converted to a universal checkpoint "
                              f"({type(exc).__name__}: {exc}); converter output:\n{tail}") from None
    finally:
        (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter writes it beside its output
    size = sum(p.stat().st_size for p in sources)
    (tmp / DONE).write_text(json.dumps({"source_bytes": size, "seconds": time.perf_counter() - started}))
    if final.exists() and not is_converted(tag_dir):
        shutil.rmtree(final, ignore_errors=True)  # a folder without DONE was never renamed in whole: not ours
    try:
        os.rename(tmp, final)  # atomic; fails when another process won the race with a whole conversion
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_converted(tag_dir):
            raise CheckpointError(f"cannot move the universal conversion into {final}") from None
        return False
    return True


def _run_ds_to_universal(tag_dir: Path, out: Path) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    # One worker: no process pool forked from a process that holds a process group.
    args = Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)  # ZeRO-1/2: the plain data-parallel layout, no tensor-parallel info
    ds_to_universal.main(args)


def _remove_dead_attempts(tag_dir: Path) -> None:
    """Temporary folders of conversions whose process died on this host (another host's may still be live)."""
    host = socket.gethostname()
    for tmp in tag_dir.glob(f".{UNIVERSAL}.tmp.*"):
        owner, _, pid = tmp.name.removeprefix(f".{UNIVERSAL}.tmp.").rpartition(".")
        if owner == host and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(tag_dir: Path, is_main: bool) -> bool:
    """Every rank calls this: rank 0 converts (if needed) while the others wait; all see the same outcome.

    Returns whether this call converted. A failure on rank 0 is raised on every rank, so none is left
    waiting in a collective.
    """
    import torch
    import torch.distributed as dist

    converted, error = False, None
    if is_main:
        try:
            converted = convert(tag_dir)
        except CheckpointError as exc:
            error = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if error is not None else 0.0, 1.0 if converted else 0.0])
        dist.all_reduce(flag)  # also the barrier: nobody reads the folder before rank 0 renamed it
        failed, converted = flag[0].item() > 0, flag[1].item() > 0
        if failed and error is None:
            raise CheckpointError(f"rank 0 could not convert checkpoint {tag_dir} to a universal checkpoint")
    if error is not None:
        raise error
    return converted


@contextlib.contextmanager
def universal_loading(eng: Any):
    """Load with DeepSpeed's `checkpoint.load_universal` on (`eng` is training.engine.Engine).

    The engine is built before we know which checkpoint it resumes from; DeepSpeed reads this setting
    only inside `load_checkpoint`, so turning it on for the load is the same as having it in the JSON.
    """
    config = eng.engine._config
    before = config.load_universal_checkpoint
    # DeepSpeed 0.19's ZeRO-3 universal load copies the first param group's settings onto every group, so
    # biases and norms would get the matrices' weight decay. The groups' settings come from the config
    # (unchanged on a resume; the learning rate is set every step), so they are put back after the load.
    settings = [{k: v for k, v in group.items() if k != "params"} for group in eng.optimizer.param_groups]
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
    for group, saved in zip(eng.optimizer.param_groups, settings, strict=True):
        group.update(saved)
    untie_step_counters(eng.optimizer)


def untie_step_counters(optimizer: Any) -> None:
    """Give each parameter its own Adam step counter.

    DeepSpeed 0.19's universal load puts one and the same step tensor into the state of every flat
    partition; torch's AdamW increments it in place once per partition, so with two param groups
    (decay, no decay) the count would run twice as fast and the bias correction drift from the
    unbroken run from the second step on.
    """
    import torch

    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))
