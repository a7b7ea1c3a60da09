"""Fine-tuning objectives: how a task's examples become tensors, a model, a loss, a score and an export.

An objective is one class; `Finetuner` and the finetune stage call only its
methods, so a new objective needs no edit anywhere else. A task kind
(training.tasks) names its objective by the `objective` attribute; users add
their own with `@register_objective("name")`, in a module that the config's
`custom_import` loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.tasks import Example, LabelMap, TaskDataError, truncate


@dataclass
class Encoded:
    ids: list[list[int]]
    targets: list[int] | list[list[int]]  # class ids, or per-token targets (-100 = no loss) for SFT
    truncated: int = 0


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




@dataclass
class Prepared:
    """A task's data made ready for one objective: encoded train/eval sets and what the objective learnt of them."""

    train: Any  # training.finetune.Encoded
    evaluation: Any
    labels: list[str] = field(default_factory=list)
    pooling: str = "last"  # classification: which hidden states the head reads


@dataclass
class EvalTally:
    """What evaluation accumulates over batches."""

    n: int
    losses: list[float] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)


class Objective:
    """The interface; see ClassificationObjective and SftObjective for the two built in."""

    name = ""
    new_head = False  # adds weights of its own beside the GPT's (what task.head_lr sets the rate of)
    pools = False  # reads task.pooling

    def prepare(self, tokenizer: Any, train: list[Example], evaluation: list[Example], task: Any,
                block_size: int, eot: int) -> Prepared:
        raise NotImplementedError

    def model(self, gpt: torch.nn.Module, config: Any, prepared: Prepared) -> torch.nn.Module:
        return gpt

    def forward(self, engine: Any, ids: torch.Tensor, lengths: torch.Tensor, targets: list[Any],
                lm_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def tally(self, tally: EvalTally, chunk: list[int], out: torch.Tensor, loss: torch.Tensor,
              targets: list[Any]) -> None:
        raise NotImplementedError

    def metrics(self, tally: EvalTally, prepared: Prepared) -> dict[str, Any]:
        return {"eval_loss": sum(tally.losses) / max(sum(tally.weights), 1)}

    def score(self, result: dict[str, Any]) -> float:
        """Higher is better: which evaluation's weights are kept."""
        return -result["eval_loss"]

    def report(self, result: dict[str, Any], prepared: Prepared) -> dict[str, Any]:
        """Extra files of the best evaluation, written beside metrics.json: {file name: JSON body}."""
        return {}

    def export(self, state: dict[str, torch.Tensor], config: Any, prepared: Prepared, tokenizer_dir: Path,
               out: Path, task: Any, eot: int) -> None:
        from training.export import export_hf

        export_hf(state, config, tokenizer_dir, out)


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def add(cls: type[Objective]) -> type[Objective]:
        instance = cls()
        instance.name = name
        OBJECTIVES[name] = instance
        return cls

    return add


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise TaskDataError(f"objective {name!r} is not registered; known objectives: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


@register_objective("classification")
class ClassificationObjective(Objective):
    """GPT-1's: a linear head on the last real token (or the mean), cross-entropy plus the auxiliary LM loss."""

    new_head = True
    pools = True

    def prepare(self, tokenizer: Any, train: list[Example], evaluation: list[Example], task: Any,
                block_size: int, eot: int) -> Prepared:
        labels = LabelMap.from_examples(train)
        if len(labels.labels) < 2:  # one class: a 100% that says nothing (a file sorted by label, cut short)
            raise TaskDataError(
                f"{task.train}: every row's label column {task.label_key!r} holds {labels.labels[0]!r}; a "
                "classification task needs at least two labels in its training file (a file sorted by label and "
                "cut short keeps one)")
        return Prepared(
            train=encode_classification(tokenizer, train, labels.ids(train, task.train), block_size, task.truncate),
            evaluation=encode_classification(tokenizer, evaluation, labels.ids(evaluation, task.eval), block_size,
                                             task.truncate),
            labels=labels.labels, pooling=task.pooling)

    def model(self, gpt: torch.nn.Module, config: Any, prepared: Prepared) -> torch.nn.Module:
        from training.classifier import GPTClassifier

        model = GPTClassifier(config, len(prepared.labels), pooling=prepared.pooling)
        model.gpt = gpt
        return model

    def forward(self, engine: Any, ids: torch.Tensor, lengths: torch.Tensor, targets: list[Any],
                lm_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.tensor(targets, dtype=torch.long, device=ids.device)
        return engine(ids, lengths, labels, lm_weight)

    def tally(self, tally: EvalTally, chunk: list[int], out: torch.Tensor, loss: torch.Tensor,
              targets: list[Any]) -> None:
        if not tally.predictions:
            tally.predictions = [0] * tally.n
        for i, pred in zip(chunk, out.argmax(-1).tolist(), strict=True):
            tally.predictions[i] = pred
        tally.losses.append(float(loss) * len(chunk))
        tally.weights.append(len(chunk))

    def metrics(self, tally: EvalTally, prepared: Prepared) -> dict[str, Any]:
        from training.task_metrics import accuracy, macro_f1

        gold = list(prepared.evaluation.targets)
        return {**super().metrics(tally, prepared), "eval_accuracy": accuracy(gold, tally.predictions),
                "eval_macro_f1": macro_f1(gold, tally.predictions, len(prepared.labels)),
                "predictions": tally.predictions}

    def score(self, result: dict[str, Any]) -> float:
        return result["eval_accuracy"]

    def report(self, result: dict[str, Any], prepared: Prepared) -> dict[str, Any]:
        from training.task_metrics import confusion_matrix

        matrix = confusion_matrix(list(prepared.evaluation.targets), result["predictions"], len(prepared.labels))
        return {"confusion.json": {"labels": prepared.labels, "matrix": matrix}}

    def export(self, state: dict[str, torch.Tensor], config: Any, prepared: Prepared, tokenizer_dir: Path,
               out: Path, task: Any, eot: int) -> None:
        from training.classifier import export_classifier

        export_classifier(state, config, prepared.labels, eot, tokenizer_dir, out, truncate=task.truncate,
                          pooling=prepared.pooling)


@register_objective("sft")
class SftObjective(Objective):
    """Prompt + response + end-of-text, with the loss on the response tokens only."""

    def prepare(self, tokenizer: Any, train: list[Example], evaluation: list[Example], task: Any,
                block_size: int, eot: int) -> Prepared:
        return Prepared(train=encode_sft(tokenizer, train, eot, block_size, task.truncate),
                        evaluation=encode_sft(tokenizer, evaluation, eot, block_size, task.truncate))

    def forward(self, engine: Any, ids: torch.Tensor, lengths: torch.Tensor, targets: list[Any],
                lm_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.full_like(ids, -100)
        for i, t in enumerate(targets):
            y[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return engine(ids, y)

    def tally(self, tally: EvalTally, chunk: list[int], out: torch.Tensor, loss: torch.Tensor,
              targets: list[Any]) -> None:
        scored = sum(1 for t in targets for v in t if v != -100)
        tally.losses.append(float(loss) * scored)
        tally.weights.append(scored)
