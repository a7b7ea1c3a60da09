"""What a fine-tuning step costs with length-grouped batches against plain shuffled ones, on each classification
task in ../shared/data, from bench/finetune.py's pretrained models (run that first, or pass --root of one).

    .venv/bin/python bench/finetune_step_time.py [--tasks sst2,shop] [--root runs/bench-finetune]
                                                 [--steps 60] [--rounds 2]

Builds the task's model and ZeRO-3 engine as the finetune stage does, then times `--steps` optimizer steps
(forward with the LM term, backward, step; no evaluation) in rounds A B A B, so a load change hits both sides.
Prints ms per step, tokens per batch (real and padded) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.finetune import BENCHES, emit, overrides_for  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def train_on(finetuner: Any, batches: list) -> None:
    """Optimizer steps on the given micro-batches, as Finetuner.run takes them (no evaluation)."""
    for rows, targets in batches:
        _, loss = finetuner._forward(rows, targets, finetuner.task.lm_loss_weight)
        finetuner.eng.engine.backward(loss)
        finetuner.eng.engine.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,shop")
    parser.add_argument("--root", type=Path, default=Path("runs/bench-finetune"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from pipeline.stages.finetune import build_task_run, init_folder
    from training.engine import init_distributed
    from training.finetune import Finetuner

    dist = init_distributed()
    for name in args.tasks.split(","):
        bench = BENCHES[name]
        workdir = args.root / name
        cfg = load_config(None, [*overrides_for(bench, workdir, []),
                                 f"finetune.tasks=[{json.dumps(bench.task(), ensure_ascii=False)}]"])
        init = init_folder(cfg)
        if not (init / "config.json").is_file():
            print(f"{init}: no pretrained export; run bench/finetune.py --tasks {name} --pretrain-only")
            return 2
        run = build_task_run(cfg, cfg.finetune.tasks[0], dist, scratch=False, seed=1337)
        task, eng = run.task, run.finetuner.eng
        timings: dict[bool, list[float]] = {True: [], False: []}
        tokens: dict[bool, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for grouped in (True, False):
                side = Finetuner(run.finetuner.model, eng, task.model_copy(update={"group_by_length": grouped}),
                                 run.prepared, pad_id=run.eot, objective=run.goal, seed=1337)
                batches = side._micro_batches()
                drawn = [next(batches) for _ in range(args.steps + 2)]
                real = statistics.fmean(sum(map(len, rows)) for rows, _ in drawn)
                padded = statistics.fmean(len(rows) * max(map(len, rows)) for rows, _ in drawn)
                tokens[grouped] = (real, padded)
                train_on(side, drawn[:2])  # warm-up steps, not timed
                started = time.perf_counter()
                train_on(side, drawn[2:])
                timings[grouped].append(1000 * (time.perf_counter() - started) / args.steps)
        grouped_ms, plain_ms = statistics.median(timings[True]), statistics.median(timings[False])
        emit(figure=f"{name}_finetune_ms_per_step", grouped=round(grouped_ms, 1), plain=round(plain_ms, 1),
             ratio=round(grouped_ms / plain_ms, 3), rounds=timings, steps=args.steps,
             real_tokens_per_batch=round(tokens[True][0], 1), padded_tokens_grouped=round(tokens[True][1], 1),
             padded_tokens_plain=round(tokens[False][1], 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
