"""Learning rate: linear warmup, then a cosine decay to a floor.

A pure function of the step, so a resumed run gets the same rate as one that
never stopped, with no scheduler state to save. Under a wall-clock budget the
decay also follows the share of the budget spent (carried in checkpoints).
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          budget_spent: float = 0.0) -> float:
    """The rate for optimizer step `step` (0-based) of a run of `max_steps` steps.

    `budget_spent` (0..1) is the share of a wall-clock budget used so far: after warm-up the decay follows
    whichever of the step count and the budget is nearer its end, so a run stopped by its budget has still
    annealed (stopping at the peak rate would waste most of what the decay gains).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max((step - warmup_steps) / decay_steps, budget_spent))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
