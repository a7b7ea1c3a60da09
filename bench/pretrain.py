"""Pretraining on Tiny Shakespeare: our DeepSpeed ZeRO-3 loop against a plain PyTorch loop, and time to quality.

    .venv/bin/python bench/pretrain.py [--config bench/pretrain_shakespeare.yaml] [--budget 186]
                                       [--arms adamw+cosine muon+wsd ...] [--slice-steps 10]
                                       [--skip-throughput] [--skip-quality] [KEY.PATH=VALUE ...]

Data: ../shared/data/tinyshakespeare/input.txt, the first 90% of its bytes as training text and the last 10% as
`data.val_inputs` (nanoGPT's split). prep, tokenizer and shard run first through the real stages (not timed,
as nanoGPT's prepare.py is not). Prints one JSON line per figure:

- `zero3_vs_plain_tokens_per_sec`: tokens/s of the ZeRO-3 training loop (training.loop.Trainer on a DeepSpeed
  engine) against a plain PyTorch loop (same model, same batches, AdamW, clipping, same precision), measured
  alternately in this process so both see the same machine load. Target ratio >= 0.7.
- `arm` (one line per arm) and `arms_side_by_side`: AdamW vs Muon and cosine vs WSD (`--arms`), the same model,
  each trained for the same `--budget` of its own wall time in one process, taking turns of `--slice-steps`
  steps so that all arms see the same machine load. Per arm: val bits per byte on the whole val split when
  the budget runs out, and the wall time from the start (imports, the arm's set-up, its training and
  evaluations) to the first evaluation at or under 2.72 bits per byte. The reference is nanoGPT's CPU recipe:
  186 s to 2.72 on this 2-core machine (../shared/data/README.md; nanoGPT is not installed here).
- `muon_steps_to_adamw_final`: per schedule, the first evaluated Muon step at or under AdamW's final val
  bits per byte, over AdamW's steps (target <= 0.8).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Python puts a script's folder first on sys.path; import from the repository root instead, so that no file in
# bench/ can shadow a standard-library module.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NANOGPT_CPU_SECONDS = 186.0
TARGET_BPB = 2.72


def emit(figure: str, **values: Any) -> None:
    print(json.dumps({"figure": figure, **values}), flush=True)


def cut_data(folder: Path) -> tuple[Path, Path]:
    """nanoGPT's split: first 90% of the bytes for training, the rest for validation."""
    data = SHAKESPEARE.read_bytes()
    cut = int(len(data) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "train.txt", folder / "val.txt"
    train.write_bytes(data[:cut])
    val.write_bytes(data[cut:])
    return train, val


def copy_prepared(work: Path, workdir: Path) -> None:
    """A fresh workdir holding `work`'s tokenizer and shards (prepared once, not timed)."""
    import shutil

    for name in ("tokenizer", "shards"):
        shutil.copytree(work / name, workdir / name, dirs_exist_ok=True)


def prepare(cfg: Any) -> dict[str, float]:
    from pipeline.core.runner import run_stage

    seconds = {}
    for name in ("prep", "tokenizer", "shard"):
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            run_stage(cfg, name)
        seconds[name] = time.perf_counter() - started
    return seconds


def plain_loop(setup: Any) -> Any:
    """The reference: the same GPT, batches, AdamW groups, schedule, clipping and precision, no DeepSpeed."""
    import torch

    from training.data import PackedLoader
    from training.engine import param_groups
    from training.model import GPT
    from training.schedule import lr_at

    train = setup.trainer.train_cfg
    torch.manual_seed(train.seed)
    model = GPT(setup.gcfg).train()
    dtype = torch.bfloat16 if setup.precision == "bf16" else None
    if dtype is not None:
        model = model.to(dtype)  # as DeepSpeed's bf16 mode: 16-bit weights in the model, fp32 copy in the optimizer
    master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()] if dtype else None
    params = list(model.parameters())
    groups = param_groups(model, train.weight_decay)
    if master is not None:
        index = {id(p): i for i, p in enumerate(params)}
        groups = [{**g, "params": [master[index[id(p)]] for p in g["params"]]} for g in groups]
    opt = torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=1e-8)
    loader = PackedLoader(setup.paths["shards"], "train", block_size=setup.gcfg.block_size,
                          micro_batch_size=train.micro_batch_size, seed=train.seed,
                          tokenizer_sha256=setup.manifest["tokenizer_sha256"], vocab_size=setup.gcfg.vocab_size)
    state = {"step": 0}

    def step() -> None:
        for group in opt.param_groups:
            group["lr"] = lr_at(state["step"], train.lr, train.min_lr, train.warmup_steps, train.max_steps)
        for _ in range(train.grad_accum):
            x, y = loader.next_batch()
            _, loss = model(x, y)
            (loss / train.grad_accum).backward()
            loss.item()
        if master is not None:
            for p, m in zip(params, master, strict=True):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(master or params, train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not None:
            with torch.no_grad():
                for p, m in zip(params, master, strict=True):
                    p.copy_(m)
        state["step"] += 1

    return step


def throughput(cfg: Any, steps: int, rounds: int) -> None:
    from pipeline.stages.pretrain import build

    setup = build(cfg)
    trainer = setup.trainer
    trainer.progress = False  # stdout carries the JSON lines only
    train = cfg.train
    tokens_per_step = train.micro_batch_size * train.grad_accum * setup.gcfg.block_size
    plain_step = plain_loop(setup)

    def ours(n: int) -> float:
        trainer.train_cfg = train.model_copy(update={"max_steps": trainer.step + n, "eval_every": 10**9,
                                                     "checkpoint_every": 10**9, "warmup_steps": 0})
        result = trainer.run()
        return result.tokens_per_sec

    def reference(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            plain_step()
        return n * tokens_per_step / (time.perf_counter() - started)

    reference(3)
    ours(3)  # warm-up: first-call allocations, DeepSpeed's lazy set-up
    plain, zero3 = [], []
    for _ in range(rounds):
        plain.append(reference(steps))
        zero3.append(ours(steps))
    # the median of per-round ratios: each pair ran back to back, so a load change between rounds cancels out
    ratio = statistics.median(z / p for z, p in zip(zero3, plain, strict=True))
    emit("zero3_vs_plain_tokens_per_sec", zero3=round(statistics.median(zero3)), plain=round(statistics.median(plain)),
         ratio=round(ratio, 3), target=0.7, rounds=rounds, steps_per_round=steps, precision=setup.precision,
         zero3_rounds=[round(z) for z in zero3], plain_rounds=[round(p) for p in plain],
         zero_stage=setup.eng.ds_config["zero_optimization"]["stage"], world_size=setup.eng.dist.world_size,
         params=setup.n_params)


# The arms `--arms` compares by default: the optimizer and the schedule, each with the other at today's choice.
ARMS = {
    "adamw+cosine": ["train.optimizer=adamw", "train.schedule=cosine"],
    "adamw+wsd": ["train.optimizer=adamw", "train.schedule=wsd"],
    "muon+cosine": ["train.optimizer=muon", "train.schedule=cosine"],
    "muon+wsd": ["train.optimizer=muon", "train.schedule=wsd"],
}


def run_arms(load: Callable[[list[str]], Any], arms: dict[str, list[str]], budget_s: float,
             slice_steps: int = 10) -> dict[str, dict[str, Any]]:
    """Train every arm for `budget_s` of its own wall time, taking turns of `slice_steps` steps.

    Interleaved in one process, so a change in the machine's load between arms hits all of them alike and
    their ratios hold on a shared machine. Each arm's clock: a set-up and its own training and evaluation
    time (Trainer's budget counts only its own turns).
    Each arm is charged the first arm's set-up (a cold start: it imports DeepSpeed), the others' being warm.
    `load(overrides)` gives the config of an arm, with its workdir holding tokenizer and shards.
    """
    from pipeline.stages.pretrain import build

    setups: dict[str, Any] = {}
    cold_s = 0.0
    for name, overrides in arms.items():
        t0 = time.perf_counter()
        cfg = load(overrides)
        setups[name] = build(cfg)
        cold_s = cold_s or time.perf_counter() - t0  # the first set-up imports DeepSpeed: a user's cold start
    # Every arm is charged the same cold start, so all train for the same time.
    setup_s = dict.fromkeys(setups, cold_s)
    for setup in setups.values():
        setup.trainer.progress = False
        setup.trainer.train_cfg = setup.trainer.train_cfg.model_copy(
            update={"max_minutes": max(0.01, (budget_s - cold_s) / 60)})
    results: dict[str, Any] = {}
    evals_of: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    while len(results) < len(setups):
        for name, setup in setups.items():
            if name in results:
                continue
            result = setup.trainer.run(pause_at=setup.trainer.step + slice_steps)
            evals_of[name] += result.evals
            if result.reason != "paused":
                results[name] = result
    out = {}
    for name, setup in setups.items():
        result, trainer, evals = results[name], setup.trainer, evals_of[name]
        reached = next((e for e in evals if e["val_bpb"] <= TARGET_BPB), None)
        out[name] = {
            "val_bpb": round(result.val["val_bpb"], 4), "val_loss": round(result.val["val_loss"], 4),
            "steps": result.step, "stopped_by": result.reason,
            "seconds_to_target": round(setup_s[name] + reached["seconds"], 1) if reached else None,
            "step_at_target": reached["step"] if reached else None,
            "setup_seconds": round(setup_s[name], 1), "train_seconds": round(trainer.budget_used_s, 1),
            "tokens_per_sec": round(trainer.train_cfg.micro_batch_size * setup.gcfg.block_size * result.step
                                    / max(trainer.budget_used_s, 1e-9)),
            "evals": [(e["step"], round(setup_s[name] + e["seconds"], 1), round(e["val_bpb"], 3)) for e in evals],
            "params": setup.n_params, "precision": setup.precision,
        }
    return out


def steps_to_match(evals: list[tuple[int, float, float]], target_bpb: float) -> int | None:
    """The first evaluated step at or under `target_bpb` (evals as run_arms reports them)."""
    return next((step for step, _, bpb in evals if bpb <= target_bpb), None)


def quality(load: Callable[[list[str]], Any], arms: dict[str, list[str]], budget_s: float, slice_steps: int,
            overrides: list[str]) -> None:
    results = run_arms(load, arms, budget_s, slice_steps)
    cfg = load([])
    common = {"budget_seconds": budget_s, "target_bpb": TARGET_BPB, "reference_seconds": NANOGPT_CPU_SECONDS,
              "reference": "nanoGPT CPU recipe, ../shared/data/README.md", "tokenizer_vocab": cfg.tokenizer.vocab_size,
              "model": {k: getattr(cfg.model, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
              "micro_batch_size": cfg.train.micro_batch_size, "lr": cfg.train.lr, "muon_lr": cfg.train.muon_lr,
              "overrides": overrides, "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    for name, figures in results.items():
        emit("arm", arm=name, **figures)
    # Muon's steps to AdamW's final quality, per schedule (same model, same wall time).
    for schedule in ("cosine", "wsd"):
        adam, muon = results.get(f"adamw+{schedule}"), results.get(f"muon+{schedule}")
        if adam and muon:
            matched = steps_to_match(muon["evals"], adam["val_bpb"])
            emit("muon_steps_to_adamw_final", schedule=schedule, adamw_val_bpb=adam["val_bpb"],
                 adamw_steps=adam["steps"], muon_steps=matched,
                 ratio=round(matched / adam["steps"], 3) if matched else None, target=0.8)
    emit("arms_side_by_side", **common,
         table={name: {k: r[k] for k in ("val_bpb", "seconds_to_target", "steps", "tokens_per_sec")}
                for name, r in results.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "bench" / "pretrain_shakespeare.yaml")
    parser.add_argument("--budget", type=float, default=NANOGPT_CPU_SECONDS)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                        help="the arms trained side by side (interleaved) for the quality figures")
    parser.add_argument("--slice-steps", type=int, default=10, help="steps an arm trains before the next one's turn")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE")
    args = parser.parse_args()

    from pipeline.config import load_config

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        root = args.workdir or Path(tmp)
        train_txt, val_txt = cut_data(root / "data")
        base = [f"data.inputs=[{train_txt}]", f"data.val_inputs=[{val_txt}]"]
        cfg = load_config(args.config, [*base, f"workdir={root / 'work'}", *args.overrides])
        seconds = prepare(cfg)
        emit("prepare_seconds", **{k: round(v, 1) for k, v in seconds.items()})
        # Quality first, while DeepSpeed is not yet imported: its import and set-up count against the budget.
        if not args.skip_quality:
            arms = {name: ARMS[name] for name in args.arms}
            workdirs = itertools.count()

            def load(overrides: list[str]) -> Any:
                timed = root / "timed" / f"arm{next(workdirs)}"
                copy_prepared(root / "work", timed)
                return load_config(args.config, [*base, f"workdir={timed}", *args.overrides, *overrides])

            quality(load, arms, args.budget, args.slice_steps, args.overrides)
        if not args.skip_throughput:
            # The plain loop is AdamW's, so ours runs AdamW too for this figure.
            throughput(load_config(args.config, [*base, f"workdir={root / 'work'}", *args.overrides,
                                                 "train.optimizer=adamw"]), args.steps, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
