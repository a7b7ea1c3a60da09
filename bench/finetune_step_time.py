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

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.finetune import BENCHES, emit, overrides_for  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,shop")
    parser.add_argument("--root", type=Path, default=Path("runs/bench-finetune"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from pipeline.stages.finetune import _base_model, _tokenizer, init_folder
    from training.engine import build_engine, init_distributed
    from training.finetune import Finetuner, task_lr_ratio, task_train_config
    from training.objectives import objective
    from training.tasks import task_kind

    dist = init_distributed()
    for name in args.tasks.split(","):
        bench = BENCHES[name]
        workdir = args.root / name
        cfg = load_config(None, [*overrides_for(bench, workdir, []),
                                 f"finetune.tasks=[{json.dumps(bench.task(), ensure_ascii=False)}]"])
        init = init_folder(cfg)
        if not (init / "config.json").is_file():
            print(f"{init}: no pretrained export; run bench/finetune.py --tasks {name} --pretrain-only first")
            return 2
        task = cfg.finetune.tasks[0]
        tokenizer = _tokenizer(cfg, init)
        eot = tokenizer.token_to_id(cfg.tokenizer.eot_token)
        goal = objective(task_kind(task.kind).objective)
        train, evaluation = task_kind(task.kind)().load(task)
        gpt, gpt_config = _base_model(cfg, init, False, tokenizer.get_vocab_size())
        prepared = goal.prepare(tokenizer, train, evaluation, task, gpt_config.block_size, eot)
        model = goal.model(gpt, gpt_config, prepared)
        eng = build_engine(model, task_train_config(cfg.train, task), dist,
                           lr_ratio=task_lr_ratio(task, gpt_config.n_layer))
        timings: dict[bool, list[float]] = {True: [], False: []}
        tokens: dict[bool, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for grouped in (True, False):
                side = Finetuner(model, eng, task.model_copy(update={"group_by_length": grouped}), prepared,
                                 pad_id=eot, objective=goal, seed=1337)
                batches = side._micro_batches()
                drawn = [next(batches) for _ in range(args.steps + 2)]
                real = statistics.fmean(sum(map(len, rows)) for rows, _ in drawn)
                padded = statistics.fmean(len(rows) * max(map(len, rows)) for rows, _ in drawn)
                tokens[grouped] = (real, padded)
                for rows, targets in drawn[:2]:  # warm-up steps, not timed
                    _, loss = side._forward(rows, targets, task.lm_loss_weight)
                    eng.engine.backward(loss)
                    eng.engine.step()
                started = time.perf_counter()
                for rows, targets in drawn[2:]:
                    _, loss = side._forward(rows, targets, task.lm_loss_weight)
                    eng.engine.backward(loss)
                    eng.engine.step()
                timings[grouped].append(1000 * (time.perf_counter() - started) / args.steps)
        grouped_ms, plain_ms = statistics.median(timings[True]), statistics.median(timings[False])
        emit(figure=f"{name}_finetune_ms_per_step", grouped=round(grouped_ms, 1), plain=round(plain_ms, 1),
             ratio=round(grouped_ms / plain_ms, 3), rounds=timings, steps=args.steps,
             real_tokens_per_batch=round(tokens[True][0], 1), padded_tokens_grouped=round(tokens[True][1], 1),
             padded_tokens_plain=round(tokens[False][1], 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
