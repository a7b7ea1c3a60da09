"""Fine-tuning one task on the DeepSpeed engine that pretraining uses, with early stopping.

What is trained and how it is scored is the task's objective
(training.objectives: classification, sft, or a user's own). Evaluation runs every `eval_every` steps; the best weights
(by eval accuracy, or eval loss for SFT) are kept and exported.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.config import TaskConfig, TrainConfig
from training.objectives import EvalTally, Objective, Prepared
from training.schedule import lr_at
from training.tasks import TaskDataError


@dataclass
class FinetuneResult:
    metrics: dict[str, float]
    best_state: dict[str, torch.Tensor] | None
    history: list[dict[str, float]] = field(default_factory=list)
    reports: dict[str, Any] = field(default_factory=dict)  # file name -> JSON body (a confusion matrix, ...)
    samples: list[dict[str, str]] = field(default_factory=list)


def pad_batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and the real length of each row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def batch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_batches(lengths: list[int], batch: int, seed: int, epoch: int, group_by_length: bool,
                  pool: int = 50) -> list[list[int]]:
    """One epoch's global batches of `batch` example indices; a pure function of its arguments.

    Grouped by length, the shuffled epoch is cut into pools of `pool` batches, each pool sorted by length and cut
    into batches, and the batches shuffled again: the rows of a batch have similar lengths, so little of it is
    padding (a random batch of SST-2 pads to 3.3x its mean length), while each batch still comes from anywhere in
    the set. The tail that fills no batch is cut from the shuffled order before sorting, so it is a random handful
    that the next epoch's shuffle brings back, as without grouping (cut after sorting, it would always be the
    longest texts).
    """
    order = batch_order(len(lengths), seed, epoch)
    order = order[: len(order) // batch * batch]
    if not group_by_length:
        return [order[s:s + batch] for s in range(0, len(order), batch)]
    batches: list[list[int]] = []
    for start in range(0, len(order), batch * pool):
        chunk = sorted(order[start:start + batch * pool], key=lengths.__getitem__)
        batches += [chunk[s:s + batch] for s in range(0, len(chunk), batch)]
    random.Random(seed * 1_000_003 + epoch + 500_009).shuffle(batches)
    return batches


@dataclass(frozen=True)
class Budget:
    """The optimizer steps one fine-tuning run takes, and why, in words for its log line."""

    steps: int
    reason: str


def plan_budget(task: TaskConfig, examples: int, global_batch: int, pretrained: bool) -> Budget:
    """`epochs` passes over the task's `examples` from a pretrained model, at most max_steps; else max_steps.

    An epoch is the full global batches of the shuffled examples (epoch_batches cuts the tail). A scratch model
    keeps max_steps: it learns everything from the labels, and early stopping ends it when it stops improving."""
    if task.epochs is None:
        return Budget(task.max_steps, "max_steps")
    if not pretrained:
        return Budget(task.max_steps, "max_steps; from random weights, epochs does not apply")
    per_epoch = max(1, examples // global_batch)
    # Rounded first, so that 1.1 epochs of 100 batches is 110 steps, not ceil(110.00000000000001).
    by_epochs = max(1, math.ceil(round(task.epochs * per_epoch, 6)))
    passes = f"{task.epochs:g} epoch{'' if task.epochs == 1 else 's'} of {examples:,} training examples in " \
             f"batches of {global_batch}"
    if by_epochs <= task.max_steps:
        return Budget(by_epochs, passes)
    return Budget(task.max_steps, f"max_steps, reached before {passes} ({by_epochs:,} steps)")


def task_schedule(task: TaskConfig) -> dict[str, Any]:
    """The task's learning-rate schedule, as training.schedule.lr_at takes it: warm-up, cosine decay to lr/10."""
    return {"lr": task.lr, "min_lr": task.lr / 10,
            "warmup_steps": max(1, round(task.max_steps * task.warmup_fraction)), "max_steps": task.max_steps}


def task_lr_ratio(task: TaskConfig, n_layer: int) -> Callable[[str], float]:
    """Each parameter's rate as a multiple of the body's `lr`: the new head at head_lr, block i at
    layer_lr_decay^(n_layer-1-i), the embeddings one step below the first block (ULMFiT-style discriminative
    rates: the lower a layer, the more general its features, the less it should move)."""
    head = (task.head_lr or task.lr) / task.lr
    decay = task.layer_lr_decay

    def ratio(name: str) -> float:
        parts = name.removeprefix("gpt.").split(".")  # a classifier holds the GPT as .gpt; SFT trains it bare
        if parts[0] == "h":
            return decay ** (n_layer - 1 - int(parts[1]))
        if parts[0] in ("wte", "wpe"):
            return decay ** n_layer
        if parts[0] in ("ln_f", "lm_head"):
            return 1.0  # the final norm (and an untied output layer) sit with the top block
        return head  # the task's own head (score.*)

    return ratio


def task_train_config(base: TrainConfig, task: TaskConfig) -> TrainConfig:
    """The pretraining engine settings with the task's own lr, batch and length."""
    return base.model_copy(update={
        **task_schedule(task), "micro_batch_size": task.micro_batch_size, "grad_accum": 1, "max_minutes": None,
        "precision": task.precision or base.precision,
        "optimizer": "adamw", "schedule": "cosine",  # task_schedule is a cosine; Muon is a pretraining choice
    })


def full_weights(engine: Any) -> dict[str, torch.Tensor]:
    """The whole weights of the engine's module on every rank (ZeRO-3 partitions gathered)."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


class Finetuner:
    def __init__(self, model: torch.nn.Module, eng: Any, task: TaskConfig, prepared: Prepared, pad_id: int,
                 objective: Objective, seed: int, log: Any = None, progress: Any = None) -> None:
        self.model, self.eng, self.task = model, eng, task
        self.prepared, self.train, self.evaluation = prepared, prepared.train, prepared.evaluation
        self.pad_id, self.objective, self.seed = pad_id, objective, seed
        self.log = log or (lambda metrics, step: None)
        self.progress = progress
        self.device = eng.dist.device
        batch = task.micro_batch_size * eng.dist.world_size
        if len(self.train.ids) < batch:  # no full batch: the batch stream would never yield
            raise TaskDataError(
                f"{task.train}: {len(self.train.ids)} training examples, fewer than one batch of {batch} "
                f"({task.micro_batch_size} per process x {eng.dist.world_size}); lower "
                "finetune.tasks[].micro_batch_size or add examples")

    def _forward(self, rows: list[list[int]], targets: list[Any], lm_weight: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths = pad_batch(rows, self.pad_id)
        return self.objective.forward(self.eng.engine, ids.to(self.device), lengths.to(self.device), targets,
                                      lm_weight)

    def _micro_batches(self):
        """This rank's micro-batches, forever; the global order depends only on the seed and the epoch."""
        dist = self.eng.dist
        mb = self.task.micro_batch_size
        lengths = [len(row) for row in self.train.ids]
        epoch = 0
        while True:
            for batch in epoch_batches(lengths, mb * dist.world_size, self.seed, epoch, self.task.group_by_length):
                mine = batch[dist.rank * mb: (dist.rank + 1) * mb]
                yield [self.train.ids[i] for i in mine], [self.train.targets[i] for i in mine]
            epoch += 1

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Every rank scores the whole eval set (ZeRO-3 needs all ranks in each forward)."""
        self.eng.engine.eval()
        n = len(self.evaluation.ids)
        tally = EvalTally(n)
        size = max(64, self.task.micro_batch_size)
        # Batches of similar lengths pad little: evaluation runs often, and padding is most of its cost.
        order = sorted(range(n), key=lambda i: len(self.evaluation.ids[i]))
        for start in range(0, n, size):
            chunk = order[start:start + size]
            rows = [self.evaluation.ids[i] for i in chunk]
            targets = [self.evaluation.targets[i] for i in chunk]
            out, loss = self._forward(rows, targets)  # eval loss: the task's own loss, without the LM term
            self.objective.tally(tally, chunk, out, loss, targets)
        self.eng.engine.train()
        return self.objective.metrics(tally, self.prepared)

    def _score(self, result: dict[str, Any]) -> float:
        return self.objective.score(result)

    def run(self) -> FinetuneResult:
        engine = self.eng.engine
        batches = self._micro_batches()
        best_score, best_state, best_eval, bad_evals = -math.inf, None, None, 0
        history: list[dict[str, float]] = []
        started, step = time.time(), 0
        for step in range(1, self.task.max_steps + 1):
            self.eng.set_lr(lr_at(step - 1, **task_schedule(self.task)))
            rows, targets = next(batches)
            _, loss = self._forward(rows, targets, self.task.lm_loss_weight)
            engine.backward(loss)
            engine.step()
            if self.progress is not None:
                self.progress.step(step, {"loss": float(loss.detach())})
            if step % self.task.eval_every == 0 or step == self.task.max_steps:
                result = self.evaluate()
                figures = {k: v for k, v in result.items() if isinstance(v, float)}
                figures["train_loss"] = float(loss.detach())
                history.append({"step": step, **figures})
                self.log(figures, step)
                if self.progress is not None:
                    self.progress.note(step, figures)
                if self._score(result) > best_score:
                    best_score, best_eval, bad_evals = self._score(result), result, 0
                    best_state = full_weights(engine)
                else:
                    bad_evals += 1
                    if bad_evals >= self.task.patience:
                        break  # early stop: the best weights are already kept
        assert best_eval is not None
        metrics = {k: v for k, v in best_eval.items() if isinstance(v, float)}
        metrics.update(steps=float(step), seconds=time.time() - started,
                       train_truncated=float(self.train.truncated), eval_truncated=float(self.evaluation.truncated))
        return FinetuneResult(metrics=metrics, best_state=best_state, history=history,
                              reports=self.objective.report(best_eval, self.prepared))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
