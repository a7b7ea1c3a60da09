"""DeepSpeed set-up: the distributed environment, the generated DeepSpeed JSON, and the engine.

The JSON comes from `TrainConfig`; `train.deepspeed` is merged over it key by
key, so any DeepSpeed option can be set without this module knowing it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataprep.errors import ScratchgptError
from training.config import TrainConfig


class EngineError(ScratchgptError, ValueError):
    """A training set-up that cannot work; the message says which key to change."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:N"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed() -> Dist:
    """Join (or create) the process group; who this process is comes from training.launch (torchrun's variables,
    srun's, or one process), the one reader of the distributed environment."""
    from training.launch import DistEnv

    env = DistEnv.from_environ()
    if env.is_distributed:
        env.apply_to_environ()  # the torchrun variables that DeepSpeed's env:// reads
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    defaults = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
    if world_size > 1:
        # Only a group of more than one meets at an address. A lone process's group lives in an in-memory store
        # (below), with no port that two runs on one machine could both want.
        defaults.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    added = [key for key in defaults if key not in os.environ]
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    cuda = use_cuda()
    backend = "nccl" if cuda else "gloo"
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
        # DeepSpeed's CPU accelerator counts devices by running `numactl --hardware` on every call (one fork per
        # training step) unless LOCAL_SIZE says it.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))

    import deepspeed
    import torch

    if not cuda:
        _skip_shm_comm_build()
    if not torch.distributed.is_initialized():
        if world_size == 1:
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if world_size == 1:
        # The defaults made up for a lone process must not leak into processes it starts (a child would take them
        # for its own). DeepSpeed reads LOCAL_RANK later, so that one stays.
        for key in added:
            if key != "LOCAL_RANK":
                os.environ.pop(key, None)
    device = "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce on first use (about 40 s of g++).

    Gloo is enough for the few processes a CPU run has, so the build is skipped unless asked for.
    """
    if os.environ.get("SCRATCHGPT_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def resolve_precision(requested: str, device: str) -> str:
    """`auto` is bf16 where the device computes it natively, else fp32."""
    import torch

    if requested != "auto":
        if requested == "fp16" and not device.startswith("cuda"):
            raise EngineError("train.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(train: TrainConfig, precision: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, `train.deepspeed` merged over it."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        zero.update({
            # Small tensors stay whole on every rank: gathering them costs more latency than the memory
            # saved. 1e5 elements is DeepSpeed's default; tiny CPU models then skip most all-gathers.
            "stage3_param_persistence_threshold": 100_000,
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "reduce_bucket_size": 50_000_000,
            "contiguous_gradients": True,
            "overlap_comm": False,  # no side streams on CPU; on GPU DeepSpeed's users turn it on
        })
    elif train.zero_stage in (1, 2):
        zero.update({"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000,
                     "contiguous_gradients": True, "overlap_comm": False})
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, passed in as a client optimizer
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the loop logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if train.optimizer == "muon":
        muon_deepspeed_keys(cfg)
    if train.activation_checkpointing:
        cfg["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    merged = deep_merge(cfg, train.deepspeed)
    _check_batch_keys(merged, world_size)
    return merged


def muon_deepspeed_keys(cfg: dict[str, Any]) -> None:
    """What DeepSpeed's Muon needs: ZeRO-3 gathers whole gradients (no reduce-scatter), and no clipping.

    ZeRO takes the clipping norm over Muon's orthogonalized updates (norm ~ sqrt(width) per matrix), so a
    clip of 1 would shrink every Muon step by that norm; Muon's updates are bounded by construction.
    """
    if cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"]["reduce_scatter"] = False
    cfg["gradient_clipping"] = 0.0


def _check_batch_keys(cfg: dict[str, Any], world_size: int) -> None:
    micro = cfg["train_micro_batch_size_per_gpu"]
    accum = cfg["gradient_accumulation_steps"]
    if cfg["train_batch_size"] != micro * accum * world_size:
        raise EngineError(
            f"train.deepspeed: train_batch_size {cfg['train_batch_size']} != micro batch {micro} x grad accum "
            f"{accum} x world size {world_size}; set train.micro_batch_size / train.grad_accum instead"
        )


def param_groups(model: Any, weight_decay: float, lr_ratio: Callable[[str], float] | None = None
                 ) -> list[dict[str, Any]]:
    """Weight decay on matrices only (GPT-2/nanoGPT practice): biases, norms and 1-D tensors are not decayed.

    `lr_ratio(name)` gives a parameter's rate as a multiple of the schedule's (a fine-tuning head, layer-wise
    decay); parameters are grouped by (decay, ratio), and Engine.set_lr keeps each group's ratio."""
    groups: dict[tuple[bool, float], list[Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (param.dim() >= 2, 1.0 if lr_ratio is None else lr_ratio(name))
        groups.setdefault(key, []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_ratio": ratio}
            for (decayed, ratio), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # the torch optimizer inside it, whose param groups carry the learning rate
    ds_config: dict[str, Any]
    precision: str
    dist: Dist

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's groups keep their ratio to AdamW's rate


def build_engine(model: Any, train: TrainConfig, dist: Dist, lr_ratio: Callable[[str], float] | None = None
                 ) -> Engine:
    """Wrap `model` in a DeepSpeed engine with `train.optimizer` (no compiled ops needed, CPU or GPU).
    `lr_ratio`: per-parameter multiples of the rate (AdamW only), as param_groups takes it."""
    import deepspeed

    from training.optim import build_optimizer

    precision = resolve_precision(train.precision, dist.device)
    ds_config = deepspeed_config(train, precision, dist.world_size)
    optimizer = build_optimizer(model, train, cuda=dist.device.startswith("cuda"), lr_ratio=lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if train.compile:
        engine.compile()  # torch.compile of the module inside the engine; ZeRO-3's hooks stay outside the graph
    return Engine(engine=engine, optimizer=optimizer, ds_config=ds_config, precision=precision, dist=dist)


def estimate_memory(n_params: int, n_layer: int, n_embd: int, n_head: int, vocab_size: int, block_size: int,
                    train: TrainConfig, precision: str, world_size: int) -> dict[str, int]:
    """Bytes one process needs at the peak of a training step, before anything is allocated.

    Weights, gradients and AdamW moments follow ZeRO's accounting (partitioned over ranks from stage 1 on);
    activations use the per-layer count of Korthikanti et al. 2022 (about 34 values per token per width unit
    in 16-bit, plus the attention matrix when the kernel materialises it), and the logits are counted
    three times (logits, softmax, their gradient), which dominates for small models with a large vocabulary.
    """
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    master = 4 * n_params
    module = act_bytes * n_params
    grads = act_bytes * n_params
    adam = 8 * n_params
    stage = train.zero_stage
    shard = max(1, world_size)
    state = (module if stage < 3 else module // shard + module) + (grads // shard if stage >= 2 else grads)
    state += (adam + (master if act_bytes == 2 else 0)) // (shard if stage >= 1 else 1)
    tokens = train.micro_batch_size * block_size
    per_layer = tokens * (34 * n_embd // 2 * act_bytes) + train.micro_batch_size * n_head * block_size**2 * act_bytes
    if train.activation_checkpointing:
        per_layer = tokens * n_embd * act_bytes
    activations = n_layer * per_layer + 3 * tokens * vocab_size * 4
    return {"weights_and_optimizer": state, "activations": activations, "total": state + activations}


def available_memory(device: str) -> int | None:
    """Free bytes for this process: the GPU's free memory, or MemAvailable shared by this node's ranks."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    from training.launch import DistEnv

    return available // max(1, DistEnv.from_environ().local_world_size)  # the processes that share this host


def check_memory(estimate: dict[str, int], available: int | None, train: TrainConfig, block_size: int) -> None:
    """Refuse a batch that cannot fit, naming the keys to change, instead of dying in the allocator."""
    if available is None or estimate["total"] <= available:
        return
    gib = 1024**3
    raise EngineError(
        f"train.micro_batch_size={train.micro_batch_size} with model.block_size={block_size} needs about "
        f"{estimate['total'] / gib:.1f} GiB per process (activations {estimate['activations'] / gib:.1f} GiB, "
        f"weights and optimizer {estimate['weights_and_optimizer'] / gib:.1f} GiB) but only "
        f"{available / gib:.1f} GiB is free; lower train.micro_batch_size (raise train.grad_accum to keep the "
        "batch), turn on train.activation_checkpointing, or use more processes with ZeRO stage 3"
    )


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each transformer block in the backward pass instead of keeping its activations.

    torch's non-reentrant checkpoint: it works with ZeRO-3's parameter hooks (the block's weights are
    gathered again for the recomputation) and needs no change in the model.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in model.h:
        forward = block.forward

        @functools.wraps(forward)
        def wrapped(x: Any, cache: Any = None, layer: int = 0, _forward: Any = forward) -> Any:
            if cache is None and x.requires_grad:
                return checkpoint(_forward, x, None, layer, use_reentrant=False)
            return _forward(x, cache, layer)

        block.forward = wrapped


# Dense bf16 peak of common GPUs (FLOP/s, no sparsity), from the vendors' data sheets; fp32 runs use TF32 at half.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
                 "RTX 4090": 165e12, "V100": 125e12}
_measured_peak: dict[str, float] = {}


def peak_flops(device: str, precision: str, refresh: bool = False) -> float:
    """FLOP/s one device can reach, for MFU: the data-sheet figure on known GPUs, else a measured matmul rate.

    A CPU has no data-sheet figure torch can read, so its peak is the best large-matmul rate seen in this
    process. On a shared machine one measurement can be low; `refresh` measures again and keeps the best.
    """
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if precision in ("bf16", "fp16") else value / 2
    key = f"{device}:{precision}"
    if key not in _measured_peak or refresh:
        rate = _matmul_rate(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        _measured_peak[key] = max(rate, _measured_peak.get(key, 0.0))
    return _measured_peak[key]


def _matmul_rate(device: str, dtype: Any) -> float:
    """Best of a few large matmuls: what this device's BLAS reaches, the CPU's practical peak."""
    import time

    import torch

    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
