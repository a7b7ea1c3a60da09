"""A one-knob-at-a-time sweep of pretraining on Tiny Shakespeare at a fixed wall time per arm.

    .venv/bin/python bench/sweep_pretrain.py [--budget 60] [--groups muon_lr adamw_lr ...] [KEY.PATH=VALUE ...]

Each group varies one knob around the base (bench/pretrain_shakespeare.yaml plus the overrides) and trains its
arms side by side with bench/pretrain.py's `run_arms`: interleaved in one process, so the arms of a group see
the same machine load and their ranking holds on a shared machine. Groups run one after the other, so compare
figures within a group, not across groups. Prints one JSON line per arm and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from bench.pretrain import copy_prepared, cut_data, prepare, run_arms  # noqa: E402

BASE = ["train.optimizer=muon", "train.schedule=wsd"]
# Each group: arm label -> overrides over the base. Model shapes keep roughly the parameter count of a fixed
# wall time in mind: a wider or deeper model takes fewer steps in the same seconds.
GROUPS: dict[str, dict[str, list[str]]] = {
    "muon_lr": {f"muon_lr={v}": [f"train.muon_lr={v}"] for v in ("0.02", "0.04", "0.08")},
    "adamw_lr": {f"adamw lr={v}": ["train.optimizer=adamw", f"train.lr={v}"] for v in ("0.0015", "0.003", "0.006")},
    "muon_adamw_lr": {f"muon, adamw part lr={v}": [f"train.lr={v}"] for v in ("0.003", "0.006")},
    "batch": {f"micro_batch={v}": [f"train.micro_batch_size={v}"] for v in ("8", "16", "32")},
    "context": {f"block_size={v}": [f"model.block_size={v}"] for v in ("64", "128", "256")},
    "shape": {
        "3x96": ["model.n_layer=3", "model.n_head=3", "model.n_embd=96"],
        "4x128": ["model.n_layer=4", "model.n_head=4", "model.n_embd=128"],
        "6x192": ["model.n_layer=6", "model.n_head=6", "model.n_embd=192"],
    },
    "vocab": {f"vocab={v}": [f"tokenizer.vocab_size={v}"] for v in ("512", "1024", "2048")},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "bench" / "pretrain_shakespeare.yaml")
    parser.add_argument("--budget", type=float, default=60.0, help="wall seconds per arm (set-up included)")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--slice-steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE")
    args = parser.parse_args()

    from pipeline.config import load_config

    rows: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="sweep-pretrain-") as tmp:
        root = Path(tmp)
        train_txt, val_txt = cut_data(root / "data")
        data = [f"data.inputs=[{train_txt}]", f"data.val_inputs=[{val_txt}]"]
        prepared: dict[str, Path] = {}  # tokenizer settings -> a workdir with that tokenizer and its shards
        workdirs = itertools.count()

        def load(overrides: list[str]) -> Any:
            cfg = load_config(args.config, [*data, *args.overrides, *BASE, *overrides])
            key = cfg.section_hash("tokenizer")
            if key not in prepared:
                work = root / f"prepared-{key}"
                with contextlib.redirect_stdout(sys.stderr):
                    prepare(cfg.model_copy(update={"workdir": str(work)}))
                prepared[key] = work
            workdir = root / "arms" / f"arm{next(workdirs)}"
            copy_prepared(prepared[key], workdir)
            return cfg.model_copy(update={"workdir": str(workdir)})

        for group in args.groups:
            arms = GROUPS[group]
            for overrides in arms.values():  # tokenizers are trained before the timed set-up
                load(overrides)
            results = run_arms(load, arms, args.budget, args.slice_steps)
            for label, figures in results.items():
                print(json.dumps({"figure": "sweep_arm", "group": group, "arm": label, "budget_seconds": args.budget,
                                  "load_average": round(os.getloadavg()[0], 2), **figures}), flush=True)
                rows.append((group, label, figures))
    print("\n| group | arm | val bits/byte | steps | tokens/s | s to 2.72 |\n|---|---|---|---|---|---|")
    for group, label, f in rows:
        print(f"| {group} | {label} | {f['val_bpb']:.3f} | {f['steps']} | {f['tokens_per_sec']:,} | "
              f"{f['seconds_to_target'] if f['seconds_to_target'] is not None else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
