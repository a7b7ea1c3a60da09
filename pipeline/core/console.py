"""datatrove's console output, kept in a log file; the terminal gets only the lines that say where a stage is.

datatrove's tasks log to stderr (loguru): a stats table per task, and the
traceback of a failed task. All of it goes to `<logging dir>/console.log`; the
terminal still sees our own `[stage]` lines, progress bars and warnings. While
the block runs, file descriptor 2 and `sys.stderr` both point into a pipe that
a thread sorts, so worker processes are covered too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

# Lines the terminal keeps: ours ("[prep] ..."), progress bars, and warnings or errors worth a look.
_KEEP = re.compile(r"^\[|%\||\| WARNING ")


@contextlib.contextmanager
def console_to(log: Path) -> Iterator[None]:
    log.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    saved_fd = os.dup(2)
    saved_stream = sys.stderr
    terminal = os.fdopen(os.dup(saved_fd), "w", buffering=1, errors="replace")

    # Writing back to sys.__stderr__ would go into the pipe again: the terminal is a copy of the old fd 2.
    shown = terminal if saved_stream is sys.__stderr__ else saved_stream

    def sort() -> None:
        try:
            out = open(log, "ab")  # noqa: SIM115 - closed below, or dropped when the disk is full
        except OSError:
            out = None
        with open(read_fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):  # always drained, or the writers would block
                if out is not None:
                    try:
                        out.write(chunk)
                    except OSError:  # a full disk: keep the terminal going, the stage reports the error
                        out = None
                pending += chunk
                *lines, pending = re.split(rb"(?<=[\n\r])", pending)
                kept = [raw.decode("utf-8", "replace") for raw in lines]
                kept = [text for text in kept if _KEEP.search(text)]
                if kept:
                    shown.write("".join(kept))
                    shown.flush()
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()

    worker = threading.Thread(target=sort, name="console-sorter", daemon=True)
    worker.start()
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    sys.stderr = os.fdopen(os.dup(write_fd), "w", buffering=1, errors="replace")
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = saved_stream
        os.dup2(saved_fd, 2)  # the last writer of the pipe closes: the sorter sees its end
        os.close(saved_fd)
        worker.join(timeout=10)
        terminal.close()
        _loguru_to_stderr()


def _loguru_to_stderr() -> None:
    """datatrove's last task left loguru writing to the stream this block replaced: point it back at the
    terminal, warnings only (datatrove's readers outside an executor, as the tokenizer uses, say little)."""
    with contextlib.suppress(ImportError, ValueError):
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
