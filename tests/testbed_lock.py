"""The lock on the machine's one Slurm test bed: tests/e2e/conftest.py holds it while a session uses the bed."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

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
