"""The sweep behind the fine-tuning defaults: each setting on every classification task, one table.

    .venv/bin/python bench/sweep_finetune.py [--tasks sst2,shop] [--root runs/bench-finetune] [--seeds 1]
                                             [--arms pretrained|both] [--only NAME,...]

Reuses (or first runs) bench/finetune.py's pretraining per task, then fine-tunes each setting
below with `--seeds` seeds. A setting is a set of task keys over the defaults; `defaults` is
what TaskConfig ships. The defaults are chosen as the setting with the best mean over the
tasks, and must transfer: no per-task keys. Prints a JSON line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.finetune import BENCHES, emit, finetune, overrides_for, pretrain  # noqa: E402
from pipeline.config import load_config  # noqa: E402

# The budget of the first sweep: 500 steps in random batches. Its rows keep it, so they still reproduce.
SHORT = {"max_steps": 500, "eval_every": 100, "patience": 3, "group_by_length": False}

# Each setting changes a few task keys; the rest are TaskConfig's defaults.
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},  # 2000 steps in length-grouped batches
    "former-defaults": {**SHORT, "lr": 1e-4, "head_lr": None, "pooling": "last", "precision": None},  # bf16
    "one-lr-1e-3-last": {**SHORT, "lr": 1e-3, "head_lr": None, "pooling": "last"},  # the former benchmark's
    "head-lr-last": {**SHORT, "lr": 3e-4, "head_lr": 3e-3, "pooling": "last"},
    "head-lr-mean": {**SHORT, "lr": 3e-4, "head_lr": 3e-3, "pooling": "mean"},
    "high-lr-mean": {**SHORT, "lr": 1e-3, "head_lr": 1e-2, "pooling": "mean"},  # the defaults at 500 steps
    "layer-decay-mean": {**SHORT, "lr": 3e-4, "head_lr": 3e-3, "pooling": "mean", "layer_lr_decay": 0.8},
    "no-lm-loss-mean": {**SHORT, "lr": 3e-4, "head_lr": 3e-3, "pooling": "mean", "lm_loss_weight": 0.0},
    "bf16-mean": {**SHORT, "lr": 3e-4, "head_lr": 3e-3, "pooling": "mean", "precision": "bf16"},
    "short-grouped": {**SHORT, "group_by_length": True},  # what grouping alone does at 500 steps
    "low-lr": {"lr": 3e-4, "head_lr": 3e-3},  # the defaults' budget at a third of their rates
    "no-lm-loss": {"lm_loss_weight": 0.0},  # the defaults without the auxiliary LM term
    "layer-decay": {"layer_lr_decay": 0.8},  # the defaults, each block's rate 0.8x the one above it
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,shop")
    parser.add_argument("--root", type=Path, default=Path("runs/bench-finetune"))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--arms", choices=["pretrained", "both"], default="pretrained")
    parser.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SETTINGS)
    table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    for task in args.tasks.split(","):
        bench = BENCHES[task]
        workdir = args.root / task
        overrides = overrides_for(bench, workdir, [])
        pretrain(load_config(None, overrides), workdir)
        for name in names:
            result = finetune(bench, overrides, SETTINGS[name], args.seeds, args.arms)
            runs = result["runs"]
            row = {"pretrained": statistics.fmean(r["eval_accuracy"] for r in runs if r["arm"] == "pretrained"),
                   "seconds": result["seconds"]}
            if args.arms == "both":
                row.update(scratch=result["scratch_mean"], gain=result["gain"],
                           gain_min=result["gain_min"])
            table[name][task] = row
            emit(figure="sweep", setting=name, task=task, **{k: round(v, 4) for k, v in row.items()},
                 settings=SETTINGS[name])
    tasks = args.tasks.split(",")
    print(f"\n| setting | {' | '.join(tasks)} | mean |\n|---|{'---|' * (len(tasks) + 1)}")
    for name in names:
        cells = [table[name][t]["pretrained"] for t in tasks]
        text = [f"{100 * v:.2f}%" + (f" ({table[name][t]['gain']:+.1f})" if "gain" in table[name][t] else "")
                for v, t in zip(cells, tasks, strict=True)]
        print(f"| {name} | {' | '.join(text)} | {100 * statistics.fmean(cells):.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
