"""The optimizers: torch's AdamW, or DeepSpeed's Muon for the hidden matrices with AdamW for the rest.

Muon (Jordan et al. 2024) orthogonalizes the momentum of each 2-D weight with a
Newton-Schulz iteration. It is meant for the matrices inside the transformer
blocks only; embeddings, the (tied) output head, biases and norms stay on AdamW.

DeepSpeed picks Muon's parameters by name when the config names `"muon"`
(`set_optimizer_flags`: any >= 2-D tensor whose name lacks "embed"/"lm_head"),
which would put GPT-2's `wte`/`wpe` on Muon. So the `MuonWithAuxAdam` is built
here, with `use_muon` set by our names, and handed to `deepspeed.initialize` as
a client optimizer: the config then names no optimizer and DeepSpeed does not
re-tag. ZeRO-3 recognises the class and runs its partitioned Muon path (which
needs `zero_optimization.reduce_scatter: false`, set in training/engine.py).

Orientation: our blocks use `nn.Linear`, stored out x in (the export transposes to
GPT-2's Conv1D in x out), and DeepSpeed's ZeRO-3 hands Muon the gradient in the
layer's shape. Muon's scale sqrt(max(1, rows/cols)) then reads rows as the output
width, the convention it was tuned with (c_fc, 4C x C, gets 2; c_proj, C x 4C, 1).
tests/test_optim.py checks the shapes that reach the update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from training.config import TrainConfig


def uses_muon(name: str, param: Any) -> bool:
    """Muon for the 2-D weights inside the blocks (`h.<i>.attn.*`, `h.<i>.mlp.*`); everything else AdamW."""
    shape = getattr(param, "ds_shape", None) or param.shape  # a ZeRO-3 partition reports its layer shape there
    return name.startswith("h.") and name.endswith(".weight") and len(shape) == 2


def muon_split(model: Any) -> dict[str, bool]:
    """Parameter name -> whether Muon updates it (tied weights appear once, under their first name: wte)."""
    return {name: uses_muon(name, p) for name, p in model.named_parameters() if p.requires_grad}


def muon_momentum_at(step: int, train: TrainConfig) -> float:
    """Muon's momentum: from muon_momentum_start to muon_momentum over the first muon_momentum_warmup steps."""
    if train.muon_momentum_warmup <= 0 or step >= train.muon_momentum_warmup:
        return train.muon_momentum
    share = step / train.muon_momentum_warmup
    return train.muon_momentum_start + share * (train.muon_momentum - train.muon_momentum_start)


def build_optimizer(model: Any, train: TrainConfig, cuda: bool, lr_ratio: Callable[[str], float] | None = None
                    ) -> Any:
    """The optimizer `train.optimizer` names, over `model`'s parameters (torch's fused AdamW kernels on GPU)."""
    import torch

    from training.engine import param_groups

    adam_args = {"betas": tuple(train.betas), "eps": 1e-8}
    if train.optimizer == "adamw":
        groups = param_groups(model, train.weight_decay, lr_ratio)
        for group in groups:
            group["lr"] = train.lr * group["lr_ratio"]
        return torch.optim.AdamW(groups, lr=train.lr, fused=cuda, **adam_args)
    if lr_ratio is not None:
        raise ValueError("per-parameter learning rates are built for adamw only")

    install_muon_update(train.muon_ns_steps, cuda)
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    muon, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        param.use_muon = uses_muon(name, param)  # ZeRO-3 reads the flag off the parameter
        (muon if param.use_muon else decay if param.dim() >= 2 else no_decay).append(param)
    # `lr_ratio` ties each group's rate to the schedule's AdamW rate (Engine.set_lr multiplies by it).
    groups = [
        {"params": muon, "use_muon": True, "lr": train.muon_lr, "lr_ratio": train.muon_lr / train.lr,
         "momentum": muon_momentum_at(0, train), "weight_decay": train.weight_decay,
         "ns_method": train.muon_ns_method},
        {"params": decay, "use_muon": False, "lr": train.lr, "weight_decay": train.weight_decay, **adam_args},
        {"params": no_decay, "use_muon": False, "lr": train.lr, "weight_decay": 0.0, **adam_args},
    ]
    groups = [g for g in groups if g["params"]]
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={"fused": cuda})


def set_muon_momentum(engine: Any, optimizer: Any, beta: float) -> None:
    """Set Muon's momentum for the next step: its param groups (no ZeRO, ZeRO-1/2) and ZeRO-3's copy."""
    for group in optimizer.param_groups:
        if group.get("use_muon"):
            group["momentum"] = beta
    zero = getattr(engine, "optimizer", None)
    if getattr(zero, "muon_beta", None) is not None:  # ZeRO-3 reads it once at start-up, unless told again
        zero.muon_beta = beta


_COMPILED = ("muon_update", "zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz")
_originals: dict[str, Any] = {}


def install_muon_update(ns_steps: int, cuda: bool) -> None:
    """DeepSpeed's `muon_update` as this run wants it: `ns_steps` iterations, and compiled only where it pays.

    DeepSpeed's optimizers look `original_muon.muon_update` up at call time and pass no `ns_steps`, so the
    module attribute is replaced by the same function with that default. DeepSpeed wraps it in torch.compile,
    which guards on the momentum (a Python float): the momentum warm-up recompiled it every step until dynamo's
    limit (8) sent it to eager anyway. So the wrapper runs eager (it is element-wise work) and only the
    Newton-Schulz matmuls inside stay compiled, on GPU; on CPU inductor's C++ builds cost more than a short
    run gains, so those run eager too. One process trains one config, so a module attribute is enough.
    """
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    if not _originals:
        _originals.update({name: getattr(original_muon, name) for name in _COMPILED})
    eager = {name: getattr(fn, "_torchdynamo_orig_callable", fn) for name, fn in _originals.items()}
    for name in _COMPILED[1:]:
        setattr(original_muon, name, _originals[name] if cuda else eager[name])
    update = functools.partial(eager["muon_update"], ns_steps=ns_steps)
    original_muon.muon_update = update
    muon_optimizer.muon_update = update
