"""How the suite splits over pytest-xdist's workers (`-n 2` in pyproject's addopts; `-n 0` runs it in one process).

Each test file stays on one worker, so its module-scoped fixtures (a prepped workdir, a trained checkpoint) are
built once, not once per worker. All of tests/e2e shares one worker: the Slurm test bed is one cluster per machine,
and a second worker would wait on its lock. (xdist's own `loadgroup` would do this with marks, but it ignores them
under pytest 9.2: pytest-dev/pytest-xdist#1386.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from testbed_lock import testbed_in_use

E2E = "tests/e2e/"
WORKER_TEARDOWN_S = 120  # the Slurm test bed comes down in seconds; a stuck worker must not hold CI for ever


def pytest_xdist_make_scheduler(config: Any, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByFileSlurmTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return E2E if path.startswith(E2E) else path

    return ByFileSlurmTogether(config, log)


def pytest_configure(config: Any) -> None:
    # Under xdist a SIGTERM (a CI timeout) reaches only this controller, and its default action would end it and
    # then its workers with no teardown: the Slurm test bed would outlive the run. Pass it on, wait for the bed
    # to come down, then stop as after Ctrl-C.
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        signal.signal(signal.SIGTERM, _stop_workers_then_self)


def _stop_workers_then_self(signum: int, frame: object) -> None:
    for pid in _children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # tests/e2e/conftest.py turns it into KeyboardInterrupt, then tears down
    # The workers then wait on this process, so wait for the test bed's lock (held from before `up` until after
    # `down`), not for them to end.
    deadline = time.monotonic() + WORKER_TEARDOWN_S
    while time.monotonic() < deadline and testbed_in_use():
        time.sleep(0.5)
    raise KeyboardInterrupt(f"signal {signum}")


def _children() -> list[int]:
    """This process's live children (the xdist workers), from /proc."""
    me, found = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if ppid == me and state != "Z":
                found.append(int(stat.parent.name))
    return found
