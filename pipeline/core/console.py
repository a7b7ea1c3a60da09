"""datatrove's console output of the tasks run in this process, kept in a log file; the terminal gets only the
lines that say where a stage is.

datatrove's tasks log to `sys.stderr` (loguru): a stats table per task, and the
traceback of a failed task. While the block runs, `sys.stderr` is a stream that
writes everything to `<logging dir>/console.log` and passes on to the terminal
only our own `[stage]` lines, progress bars and warnings. Worker processes
(`prep.workers > 1`) write to the terminal as they always did: they never see
this stream.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

# Lines the terminal keeps: ours ("[prep] ..."), progress bars, and warnings or errors worth a look.
_KEEP = re.compile(r"^\[|%\||\| (WARNING|ERROR|CRITICAL) ")


class SortingStream(io.TextIOBase):
    """Everything to `log`; the lines `_KEEP` matches to `terminal` too."""

    def __init__(self, log: TextIO | None, terminal: TextIO) -> None:
        self.log, self.terminal = log, terminal
        self.pending = ""

    def write(self, text: str) -> int:
        if self.log is not None:
            try:
                self.log.write(text)
            except OSError:  # a full disk: keep the terminal going, the stage reports the error
                self.log = None
        self.pending += text
        *lines, self.pending = re.split(r"(?<=[\n\r])", self.pending)
        kept = "".join(line for line in lines if _KEEP.search(line))
        if kept:
            self.terminal.write(kept)
            self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.flush()

    def close_log(self) -> None:
        if self.pending and _KEEP.search(self.pending):
            self.terminal.write(self.pending + "\n")
        self.pending = ""
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.close()
            self.log = None


@contextlib.contextmanager
def console_to(log: Path) -> Iterator[None]:
    terminal = sys.stderr
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        handle: TextIO | None = open(log, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except OSError:
        handle = None
    stream = SortingStream(handle, terminal)
    sys.stderr = stream  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stderr = terminal
        stream.close_log()
        _loguru_to_stderr()


def _loguru_to_stderr() -> None:
    """datatrove's last task left loguru writing to the stream this block replaced: point it back at the
    terminal, warnings only (datatrove's readers outside an executor, as the tokenizer uses, say little)."""
    with contextlib.suppress(ImportError, ValueError):
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
