"""Learning rate: linear warm-up, then a cosine decay to a floor, or warm-up-stable-decay (WSD).

A pure function of the step, so a resumed run gets the same rate as one that
never stopped, with no scheduler state to save. Under a wall-clock budget the
decay also follows the share of the budget spent (carried in checkpoints).

WSD holds the peak rate until the last `decay_fraction` of the run, so the rate of
a stable-phase step does not depend on where the run ends: a checkpoint taken
before the decay can continue into a longer run (see `extension_tag`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dataprep.errors import ScratchgptError


class ScheduleError(ScratchgptError, ValueError):
    """A run that cannot continue under its schedule; the message says what to change."""


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          budget_spent: float = 0.0, schedule: str = "cosine", decay_fraction: float = 0.2,
          decay_shape: str = "linear") -> float:
    """The rate for optimizer step `step` (0-based) of a run of `max_steps` steps.

    `budget_spent` (0..1) is the share of a wall-clock budget used so far: after warm-up the decay follows
    whichever of the step count and the budget is nearer its end, so a run stopped by its budget has still
    annealed (stopping at the peak rate would waste most of what the decay gains).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if schedule == "wsd":
        progress = wsd_progress(step, warmup_steps, max_steps, budget_spent, decay_fraction)
        remaining = 1.0 - (math.sqrt(progress) if decay_shape == "1-sqrt" else progress)
        return min_lr + remaining * (lr - min_lr)
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max((step - warmup_steps) / decay_steps, budget_spent))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def decay_start(warmup_steps: int, max_steps: int, decay_fraction: float) -> int:
    """The first step of WSD's decay by step count (never inside the warm-up)."""
    return max(warmup_steps, max_steps - max(1, round(decay_fraction * max_steps)))


def wsd_progress(step: int, warmup_steps: int, max_steps: int, budget_spent: float, decay_fraction: float) -> float:
    """How far (0..1) WSD's decay has gone: by steps, or by the budget once its remaining share is the decay's."""
    start = decay_start(warmup_steps, max_steps, decay_fraction)
    by_steps = (step - start) / max(1, max_steps - start)
    by_budget = (budget_spent - (1.0 - decay_fraction)) / decay_fraction
    return min(1.0, max(0.0, by_steps, by_budget))


def train_lr(train: Any, step: int, budget_spent: float = 0.0) -> float:
    """`lr_at` with the schedule a TrainConfig sets."""
    return lr_at(step, train.lr, train.min_lr, train.warmup_steps, train.max_steps, budget_spent=budget_spent,
                 schedule=train.schedule, decay_fraction=train.decay_fraction, decay_shape=train.decay_shape)


def in_stable_phase(train: Any, step: int, budget_spent: float = 0.0) -> bool:
    """True when step `step` (0-based) of a WSD run is before the decay: its rate is the same in a longer run."""
    return (train.schedule == "wsd"
            and wsd_progress(step, train.warmup_steps, train.max_steps, budget_spent, train.decay_fraction) == 0.0)


def schedule_meta(train: Any, stable_phase: bool) -> dict[str, Any]:
    """What a checkpoint records of its schedule for `extension_tag`; `stable_phase`: every step so far was."""
    return {"schedule": train.schedule, "max_steps": train.max_steps, "stable_phase": stable_phase}


def extension_tag(ckpt_dir: Path, latest: str, train: Any) -> str:
    """The checkpoint to resume: `latest`, unless a WSD run was given a new max_steps after it began decaying.

    Then the run continues from its newest stable-phase checkpoint (the loop writes one as the decay begins,
    and pruning keeps it), so the longer run decays at its own end as if it had been planned so.
    """
    from training.checkpoint import complete_metas, read_meta

    meta = read_meta(ckpt_dir, latest)
    if train.schedule != "wsd" or meta.get("max_steps", train.max_steps) == train.max_steps:
        return latest
    stable = [m for m in complete_metas(ckpt_dir) if m.get("stable_phase") and m.get("schedule") == "wsd"
              and in_stable_phase(train, m["step"] - 1)]
    if not stable:
        raise ScheduleError(
            f"train.max_steps changed from {meta.get('max_steps')} to {train.max_steps}, but checkpoint "
            f"{ckpt_dir / latest} is already in its decay and {ckpt_dir} holds no stable-phase checkpoint before "
            f"the new decay start (step {decay_start(train.warmup_steps, train.max_steps, train.decay_fraction)}); "
            f"set max_steps back to {meta.get('max_steps')} or use another workdir")
    return max(stable, key=lambda m: m["step"])["tag"]


def resumable_train(train: Any) -> Any:
    """The train section as far as it decides whether old checkpoints can continue: a WSD run's max_steps
    may change (the run is extended or shortened from a stable-phase checkpoint)."""
    if train.schedule != "wsd":
        return train
    return train.model_copy(update={"max_steps": 0})
