"""Pretraining on Tiny Shakespeare: our DeepSpeed ZeRO-3 loop against a plain PyTorch loop, and time to quality.

    .venv/bin/python bench/pretrain.py [--config bench/pretrain_shakespeare.yaml] [--budget 186]
                                       [--skip-throughput] [--skip-quality] [KEY.PATH=VALUE ...]

Data: ../shared/data/tinyshakespeare/input.txt, the first 90% of its bytes as training text and the last 10% as
`data.val_inputs` (nanoGPT's split). prep, tokenizer and shard run first through the real stages (not timed,
as nanoGPT's prepare.py is not). Prints one JSON line per figure:

- `zero3_vs_plain_tokens_per_sec`: tokens/s of the ZeRO-3 training loop (training.loop.Trainer on a DeepSpeed
  engine) against a plain PyTorch loop (same model, same batches, AdamW, clipping, same precision), measured
  alternately in this process so both see the same machine load. Target ratio >= 0.7.
- `seconds_to_val_bpb`: wall time from the start of the pretrain set-up (importing DeepSpeed, model, engine,
  loaders) to the first evaluation at or under 2.72 bits per byte on the whole val split. The reference is
  nanoGPT's CPU recipe: 186 s on this 2-core machine (../shared/data/README.md; nanoGPT is not installed here).
- `val_bpb_at_budget`: val bits per byte when the 186 s budget (same clock) runs out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
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


def quality(cfg: Any, budget_s: float) -> None:
    started = time.perf_counter()
    import mlflow

    from pipeline.core.tracking import setup_experiment, tracking_uri
    from pipeline.stages.pretrain import build
    from training.metrics_logger import MetricsLogger

    setup = build(cfg)
    setup_s = time.perf_counter() - started
    trainer = setup.trainer
    trainer.progress = False
    trainer.train_cfg = cfg.train.model_copy(update={"max_minutes": max(0.01, (budget_s - setup_s) / 60)})
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run_id = client.create_run(setup_experiment(cfg), run_name="bench-pretrain").info.run_id
    trainer.logger = MetricsLogger(run_id, tracking_uri(cfg))
    result = trainer.run()
    trainer.logger.close()
    tracking = trainer.logger.overhead(result.train_seconds)
    client.set_terminated(run_id)
    wall = time.perf_counter() - started
    reached = next((e for e in result.evals if e["val_bpb"] <= TARGET_BPB), None)
    common = {"reference_seconds": NANOGPT_CPU_SECONDS, "reference": "nanoGPT CPU recipe, ../shared/data/README.md",
              "tokenizer_vocab": setup.gcfg.vocab_size, "model": {k: getattr(setup.gcfg, k) for k in
                                                                  ("n_layer", "n_head", "n_embd", "block_size")},
              "micro_batch_size": cfg.train.micro_batch_size, "lr": cfg.train.lr, "precision": setup.precision,
              "zero_stage": setup.eng.ds_config["zero_optimization"]["stage"], "params": setup.n_params}
    if reached is not None:
        seconds = setup_s + reached["seconds"]
        emit("seconds_to_val_bpb", target_bpb=TARGET_BPB, seconds=round(seconds, 1), step=reached["step"],
             val_bpb=round(reached["val_bpb"], 4), ratio_to_reference=round(seconds / NANOGPT_CPU_SECONDS, 3),
             setup_seconds=round(setup_s, 1), **common)
    else:
        emit("seconds_to_val_bpb", target_bpb=TARGET_BPB, seconds=None, reached=False, **common)
    emit("val_bpb_at_budget", budget_seconds=budget_s, val_bpb=round(result.val["val_bpb"], 4),
         val_loss=round(result.val["val_loss"], 4), steps=result.step, wall_seconds=round(wall, 1),
         tokens_per_sec=round(result.tokens_per_sec), reference_val_bpb=TARGET_BPB,
         mlflow_tracking_fraction=round(tracking["tracking_fraction"], 5),
         evals=[(e["step"], round(setup_s + e["seconds"], 1), round(e["val_bpb"], 3)) for e in result.evals],
         **common)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "bench" / "pretrain_shakespeare.yaml")
    parser.add_argument("--budget", type=float, default=NANOGPT_CPU_SECONDS)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
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
            import shutil

            timed = root / "timed"
            for name in ("tokenizer", "shards"):
                shutil.copytree(root / "work" / name, timed / name, dirs_exist_ok=True)
            quality(load_config(args.config, [*base, f"workdir={timed}", *args.overrides]), args.budget)
        if not args.skip_throughput:
            throughput(load_config(args.config, [*base, f"workdir={root / 'work'}",
                                                 *args.overrides]), args.steps, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
