"""DeepSpeed checkpoints with the run state that exact resume needs, written so `latest` is always whole.

Layout under the checkpoint folder:

    step_00000200/                DeepSpeed's files for every rank, then `scratchgpt.json`, written last
    latest                        the tag of the newest complete checkpoint (replaced atomically)

DeepSpeed writes its own `latest` from rank 0 as soon as rank 0's files are
done, while other ranks may still be writing, and not atomically. So it is told
not to (`save_latest=False`); after a barrier rank 0 writes `scratchgpt.json`
(the model shape, the step, file sizes) and then swaps `latest` in with
`os.replace`. A checkpoint without `scratchgpt.json` is never pointed at.

Files are read with `torch.load(weights_only=True)`; the three small DeepSpeed classes a
ZeRO checkpoint holds are allow-listed by name, nothing else unpickles. `scratchgpt.json` also
holds every file's sha256 (training.checkpoint_integrity checks them on resume).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from dataprep.errors import ScratchgptError

META = "scratchgpt.json"
LATEST = "latest"
KEEP_LAST = 2  # complete checkpoints kept on disk; older ones are removed after a newer one is whole
CLIENT_KEY = "scratchgpt"  # our part of DeepSpeed's client_state
# Fields of the model config that decide the shapes of the weights.
SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "position")


class CheckpointError(ScratchgptError, RuntimeError):
    """A checkpoint that is missing, half-written, corrupt, or does not fit the configured model."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint's tag, None when there is none yet; an error when `latest` is broken."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    if not tag or not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest} names checkpoint {tag!r}, which is not a folder in {ckpt_dir}")
    read_meta(ckpt_dir, tag)  # raises when the checkpoint is not whole
    return tag


def read_meta(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """The metadata of a complete checkpoint; checks that every file it lists is there with its size."""
    tag_dir = Path(ckpt_dir) / tag
    path = tag_dir / META
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {META} is missing (the save was interrupted)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint metadata {path} is corrupt: {exc}") from None
    for name, size in meta.get("files", {}).items():
        file = tag_dir / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is corrupt: file {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {file} is corrupt: {file.stat().st_size} bytes, {size} were written"
            )
    return meta


def check_compatible(meta: dict[str, Any], model_config: dict[str, Any], where: str) -> None:
    """Refuse, before anything is loaded, a checkpoint whose weights do not fit the configured model."""
    saved = meta.get("model_config", {})
    if model_config.get("block_size", 0) > saved.get("block_size", math.inf) and saved.get("position") == "learned":
        raise CheckpointError(
            f"model.block_size {model_config['block_size']} is larger than the position table of checkpoint "
            f"{where} ({saved['block_size']} positions); use block_size <= {saved['block_size']} or start afresh"
        )
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, config {model_config.get(key)!r}"
        for key in SHAPE_KEYS
        if saved.get(key) != model_config.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} holds a different model shape ({'; '.join(diffs)}); resume with the model "
            "config it was trained with, or use another workdir"
        )


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every generator that training draws from, in types that `weights_only` loading accepts."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- safe loading


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # two ints, in ZeRO-1/2 optimizer files

    return [ZeroStageEnum, LossScaler, fragment_address]


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True`: tensors and plain containers, plus three small DeepSpeed classes."""
    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(exc).__name__}: {exc})") from None


# DeepSpeed checkpoint engines whose `load` is one torch.load of one finished file, so `safe_load` can stand in.
# The decoupled (asynchronous) and DataStates engines are not: refused rather than left on full pickle.
SAFE_ENGINES = ("TorchCheckpointEngine", "FastCheckpointEngine")


def _install_safe_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed read checkpoints through `safe_load` instead of unrestricted pickle, or refuse."""
    current = engine.checkpoint_engine
    cls = type(current)
    if getattr(cls, "scratchgpt_safe", False):
        return
    if cls.__name__ not in SAFE_ENGINES or not cls.__module__.startswith("deepspeed.runtime.checkpoint_engine."):
        raise CheckpointError(
            f"DeepSpeed checkpoint engine {cls.__module__}.{cls.__name__} would load checkpoints with "
            f"unrestricted pickle; scratchgpt loads only through {', '.join(SAFE_ENGINES)}",
            hint="remove the train.deepspeed keys that select another checkpoint engine (checkpoint.writer, "
                 "datastates_ckpt)")

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        return safe_load(path)

    current.__class__ = type(f"Safe{cls.__name__}", (cls,), {"load": load, "scratchgpt_safe": True})


# ---------------------------------------------------------------- save / load


def save(eng: Any, ckpt_dir: str | Path, step: int, client: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write a checkpoint on every rank; `latest` moves to it only once all ranks have finished."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine = eng.engine
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={CLIENT_KEY: client}, save_latest=False)
    if dist.is_initialized():
        dist.barrier()  # every rank's files are closed before rank 0 declares the checkpoint whole
    if eng.dist.is_main:
        from training.checkpoint_integrity import drop_recovery_scripts, file_hashes

        drop_recovery_scripts(ckpt_dir)
        tag_dir = ckpt_dir / tag
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != META}
        body = {**meta, "step": step, "tag": tag, "world_size": eng.dist.world_size,
                "zero_stage": eng.ds_config["zero_optimization"]["stage"], "precision": eng.precision,
                "global_batch": eng.ds_config["train_batch_size"], "files": files,
                "sha256": file_hashes(tag_dir, files)}
        _atomic_write(tag_dir / META, json.dumps(body, indent=2))
        _atomic_write(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep=tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: str) -> None:
    """Remove all but the newest KEEP_LAST complete checkpoints, and interrupted saves older than `keep`."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name))
    complete = [t for t in tags if (ckpt_dir / t / META).is_file()]
    kept = set(complete[-KEEP_LAST:]) | {keep}
    stable = [m["tag"] for m in complete_metas(ckpt_dir) if m.get("stable_phase")]
    kept |= set(stable[-1:])  # a WSD run's last checkpoint before its decay: where an extended run continues
    for tag in tags:
        if tag not in kept and tag < keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def rewind(eng: Any, ckpt_dir: str | Path, tag: str) -> None:
    """Make `tag` the newest checkpoint, removing later ones (a WSD run extended from its stable phase)."""
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()  # every rank has read the metadata it chose `tag` from
    if eng.dist.is_main:
        _atomic_write(ckpt_dir / LATEST, tag)
        for path in ckpt_dir.iterdir():
            if path.is_dir() and re.fullmatch(r"step_\d{8}", path.name) and path.name > tag:
                shutil.rmtree(path, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def complete_metas(ckpt_dir: str | Path) -> list[dict[str, Any]]:
    """The metadata of every complete checkpoint in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name))
    return [json.loads((ckpt_dir / t / META).read_text(encoding="utf-8")) for t in tags
            if (ckpt_dir / t / META).is_file()]


def load(eng: Any, ckpt_dir: str | Path, tag: str, model_config: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into the engine after checking it fits; returns our client state."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir, tag)
    where = str(ckpt_dir / tag)
    check_compatible(meta, model_config, where)
    if meta.get("precision") != eng.precision:
        raise CheckpointError(
            f"checkpoint {where} was trained in {meta.get('precision')}, this run uses {eng.precision}; "
            f"set train.precision={meta.get('precision')}"
        )
    from training import elastic

    load_dir, load_tag, universal = ckpt_dir, tag, contextlib.nullcontext()
    if meta.get("world_size") != eng.dist.world_size:
        elastic.check_same_batch(meta, eng.ds_config, eng.dist.world_size, where)
        if elastic.needs_universal(meta, eng.dist.world_size):  # ZeRO partitions fit only as many ranks
            elastic.prepare(ckpt_dir / tag, eng.dist.is_main)
            load_dir, load_tag = ckpt_dir / tag, elastic.UNIVERSAL
            universal = elastic.universal_loading(eng)
    _install_safe_checkpoint_engine(eng.engine)
    try:
        with universal:
            path, client = eng.engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {where} could not be loaded: {type(exc).__name__}: {exc}") from None
    if path is None or client is None or CLIENT_KEY not in client:
        raise CheckpointError(f"checkpoint {where} has no scratchgpt state (not written by scratchgpt?)")
    return client[CLIENT_KEY]


# ---------------------------------------------------------------- full weights


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


def full_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole fp32 weights of a checkpoint (ZeRO-3 partitions joined), and its metadata. One process, no dist.

    ZeRO-3 keeps, per rank and per optimizer param group, one flat fp32 tensor holding that rank's slice of
    every parameter in order; each parameter is padded to a multiple of the world size and cut in equal
    slices. Joining the slices of all ranks and dropping the padding gives the parameter back.
    """
    import torch

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist")
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise CheckpointError(f"no checkpoint in {ckpt_dir}: the file `latest` is missing")
    from training.checkpoint_integrity import verify

    meta = verify(ckpt_dir, tag)  # sizes and sha256: a damaged checkpoint is never exported or sampled from
    tag_dir = ckpt_dir / tag
    model_files = sorted(tag_dir.glob("*model_states.pt"), key=_rank_of)
    if not model_files:
        raise CheckpointError(f"checkpoint {tag_dir} has no model_states file")
    first = safe_load(model_files[0])
    if meta.get("zero_stage", 0) < 3:
        return {k: v.float() if v.is_floating_point() else v for k, v in first["module"].items()}, meta
    optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank_of)
    world = len(optim_files)
    if world != meta["world_size"]:
        raise CheckpointError(f"checkpoint {tag_dir} has {world} optimizer partitions, expected {meta['world_size']}")
    flat = [safe_load(f, mmap=True)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim_files]
    state: dict[str, Any] = {}
    for group, shapes in enumerate(first["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [flat[r][group][offset:offset + part] for r in range(world)]
            state[name] = torch.cat(pieces)[:numel].reshape(shape).clone()
            offset += part
        if offset > flat[0][group].numel():
            raise CheckpointError(f"checkpoint {tag_dir}: partitions are shorter than the parameter shapes say")
    for name in first.get("buffer_names", []):
        if name in first["module"]:
            state[name] = first["module"][name]
    for alias, source in first.get("shared_params", {}).items():
        state[alias] = state[source]
    return state, meta
