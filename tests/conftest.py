"""How the suite splits over pytest-xdist's workers (`-n 2` in pyproject's addopts; `-n 0` runs it in one process).

Each test file stays on one worker, so its module-scoped fixtures (a prepped workdir, a trained checkpoint) are
built once, not once per worker. All of tests/e2e shares one worker: the Slurm test bed is one cluster per machine,
and a second worker would wait on its lock. (xdist's own `loadgroup` would do this with marks, but it ignores them
under pytest 9.2: pytest-dev/pytest-xdist#1386.)
"""

from __future__ import annotations

from typing import Any

E2E = "tests/e2e/"


def pytest_xdist_make_scheduler(config: Any, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByFileSlurmTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return E2E if path.startswith(E2E) else path

    return ByFileSlurmTogether(config, log)
