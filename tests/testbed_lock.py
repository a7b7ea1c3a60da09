"""The lock on the machine's one Slurm test bed: `exclusive_testbed` holds it while a session uses the bed."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SESSION_LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else tempfile.gettempdir()) / "scratchgpt-testbed.lock"


def testbed_in_use() -> bool:
    """Whether some test session holds the test bed now (brings it up, uses it, or tears it down)."""
    fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return False


@contextlib.contextmanager
def exclusive_testbed(timeout: float = 600) -> Iterator[None]:
    """There is one test bed per machine: a second test session waits here instead of tearing
    down the cluster under the first one."""
    with open(SESSION_LOCK, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held the Slurm test bed ({SESSION_LOCK}) for {timeout:.0f}s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
