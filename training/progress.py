"""Where a long stage is and when it will end: a line every N steps with the figures, the rate and an ETA.

On a terminal the line redraws in place as a bar; in a Slurm log (not a
terminal) it is a plain line each time, so the log reads top to bottom.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def eta_seconds(done: int, total: int, elapsed: float, budget_left: float = math.inf) -> float:
    """Seconds left at the rate so far: the steps still to do, or the time budget left if that ends sooner."""
    if done <= 0 or elapsed <= 0:
        return budget_left if math.isfinite(budget_left) else math.inf
    return min((total - done) * elapsed / done, budget_left)


def _figures(figures: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())


class Progress:
    """Step lines for one loop of `total` steps, printed every `every` steps (and at the first and last)."""

    def __init__(self, label: str, total: int, every: int = 0, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every or (1 if self.tty else max(1, total // 20))
        self.enabled = enabled
        self.started = time.perf_counter()
        self._open_bar = False

    def step(self, step: int, figures: dict[str, Any]) -> None:
        if not self.enabled or not (step == 1 or step == self.total or step % self.every == 0):
            return
        elapsed = time.perf_counter() - self.started
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = duration(eta_seconds(step, self.total, elapsed))
        text = (f"[{self.label}] step {step}/{self.total} ({step / self.total:.0%}) {_figures(figures)} "
                f"{rate:.2f} steps/s ETA {eta}")
        if self.tty:
            width = 20
            filled = int(width * step / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            self._open_bar = step < self.total
            if not self._open_bar:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, step: int, figures: dict[str, Any]) -> None:
        """A line that stays (an evaluation), printed under the bar."""
        if not self.enabled:
            return
        if self._open_bar:
            self.stream.write("\n")
            self._open_bar = False
        self.stream.write(f"[{self.label}] step {step} {_figures(figures)}\n")
        self.stream.flush()
