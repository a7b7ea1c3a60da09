"""Fine-tuning one task on the DeepSpeed engine that pretraining uses, with early stopping.

Classification trains a linear head on the last real token (plus GPT-1's
auxiliary LM loss); SFT trains on prompt + response with the loss on the
response tokens only. Evaluation runs every `eval_every` steps; the best weights
(by eval accuracy, or eval loss for SFT) are kept and exported.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.config import TaskConfig, TrainConfig
from training.schedule import lr_at
from training.task_metrics import accuracy, confusion_matrix, macro_f1
from training.tasks import Example, truncate


@dataclass
class Encoded:
    ids: list[list[int]]
    targets: list[int] | list[list[int]]  # class ids, or per-token targets (-100 = no loss) for SFT
    truncated: int = 0


@dataclass
class FinetuneResult:
    metrics: dict[str, float]
    best_state: dict[str, torch.Tensor] | None
    history: list[dict[str, float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    confusion: list[list[int]] | None = None
    samples: list[dict[str, str]] = field(default_factory=list)


def encode_classification(tokenizer: Any, examples: list[Example], label_ids: list[int], block_size: int,
                          side: str) -> Encoded:
    encoded = tokenizer.encode_batch([e.text for e in examples])
    ids, cut = [], 0
    for enc in encoded:
        tokens, was_cut = truncate(enc.ids or [0], block_size, side)
        ids.append(tokens)
        cut += was_cut
    return Encoded(ids=ids, targets=label_ids, truncated=cut)


def encode_sft(tokenizer: Any, examples: list[Example], eot_id: int, block_size: int, side: str) -> Encoded:
    """prompt + response + end-of-text; targets are the next tokens inside the response, -100 elsewhere."""
    prompts = tokenizer.encode_batch([e.prompt or "" for e in examples])
    responses = tokenizer.encode_batch([e.text for e in examples])
    ids, targets, cut = [], [], 0
    for p, r in zip(prompts, responses, strict=True):
        seq = p.ids + r.ids + [eot_id]
        mask = [False] * len(p.ids) + [True] * (len(r.ids) + 1)
        if len(seq) > block_size + 1:
            cut += 1
            keep = block_size + 1
            seq, mask = (seq[-keep:], mask[-keep:]) if side == "left" else (seq[:keep], mask[:keep])
        ids.append(seq[:-1])
        targets.append([t if m else -100 for t, m in zip(seq[1:], mask[1:], strict=True)])
    return Encoded(ids=ids, targets=targets, truncated=cut)


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


def task_schedule(task: TaskConfig) -> dict[str, Any]:
    """The task's learning-rate schedule, as training.schedule.lr_at takes it: 5% warm-up, decay to lr/10."""
    return {"lr": task.lr, "min_lr": task.lr / 10, "warmup_steps": max(1, task.max_steps // 20),
            "max_steps": task.max_steps}


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
    def __init__(self, model: torch.nn.Module, eng: Any, task: TaskConfig, train: Encoded, evaluation: Encoded,
                 pad_id: int, objective: str, seed: int, n_classes: int = 0, log: Any = None) -> None:
        self.model, self.eng, self.task = model, eng, task
        self.train, self.evaluation = train, evaluation
        self.pad_id, self.objective, self.seed, self.n_classes = pad_id, objective, seed, n_classes
        self.log = log or (lambda metrics, step: None)
        self.device = eng.dist.device

    def _forward(self, rows: list[list[int]], targets: list[Any], lm_weight: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths = pad_batch(rows, self.pad_id)
        ids, lengths = ids.to(self.device), lengths.to(self.device)
        if self.objective == "classification":
            labels = torch.tensor(targets, dtype=torch.long, device=self.device)
            return self.eng.engine(ids, lengths, labels, lm_weight)
        y = torch.full_like(ids, -100)
        for i, t in enumerate(targets):
            y[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return self.eng.engine(ids, y)

    def _micro_batches(self):
        """This rank's micro-batches, forever; the global order depends only on the seed and the epoch."""
        dist = self.eng.dist
        mb = self.task.micro_batch_size
        epoch = 0
        while True:
            order = batch_order(len(self.train.ids), self.seed, epoch)
            glob = mb * dist.world_size
            for start in range(0, len(order) - glob + 1, glob):
                mine = order[start + dist.rank * mb: start + (dist.rank + 1) * mb]
                yield [self.train.ids[i] for i in mine], [self.train.targets[i] for i in mine]
            epoch += 1

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Every rank scores the whole eval set (ZeRO-3 needs all ranks in each forward)."""
        self.eng.engine.eval()
        n = len(self.evaluation.ids)
        preds, losses, weights = [0] * n, [], []
        size = max(64, self.task.micro_batch_size)
        # Batches of similar lengths pad little: evaluation runs often, and padding is most of its cost.
        order = sorted(range(n), key=lambda i: len(self.evaluation.ids[i]))
        for start in range(0, n, size):
            chunk = order[start:start + size]
            rows = [self.evaluation.ids[i] for i in chunk]
            targets = [self.evaluation.targets[i] for i in chunk]
            out, loss = self._forward(rows, targets)  # eval loss: the task's own loss, without the LM term
            if self.objective == "classification":
                for i, pred in zip(chunk, out.argmax(-1).tolist(), strict=True):
                    preds[i] = pred
                losses.append(float(loss) * len(rows))
                weights.append(len(rows))
            else:
                scored = sum(1 for t in targets for v in t if v != -100)
                losses.append(float(loss) * scored)
                weights.append(scored)
        self.eng.engine.train()
        result: dict[str, Any] = {"eval_loss": sum(losses) / max(sum(weights), 1)}
        if self.objective == "classification":
            gold = list(self.evaluation.targets)
            result.update(eval_accuracy=accuracy(gold, preds), eval_macro_f1=macro_f1(gold, preds, self.n_classes),
                          predictions=preds)
        return result

    def _score(self, result: dict[str, Any]) -> float:
        return result["eval_accuracy"] if self.objective == "classification" else -result["eval_loss"]

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
            if step % self.task.eval_every == 0 or step == self.task.max_steps:
                result = self.evaluate()
                figures = {k: v for k, v in result.items() if isinstance(v, float)}
                figures["train_loss"] = float(loss.detach())
                history.append({"step": step, **figures})
                self.log(figures, step)
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
                              confusion=None if self.objective != "classification" else
                              confusion_matrix(list(self.evaluation.targets), best_eval["predictions"], self.n_classes))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
