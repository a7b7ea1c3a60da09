"""The real Slurm test bed (slurm/testbed/testbed.sh) for the tests in tests/e2e, once per session.

Root only. Missing Slurm binaries fail the session in CI (CI=true) and skip it elsewhere.
The cluster is torn down in a `finally`, also when a test fails or is interrupted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testbed_lock import exclusive_testbed

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO / "slurm" / "testbed" / "testbed.sh"
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "ip", "nsenter", "unshare")
# Daemons live in sbin, which is not always on a test runner's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NODES = 2
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path
    nodes: list[str]
    node_interface: str  # the interface name inside every node: GLOO_SOCKET_IFNAME / slurm.network_interface
    python: str  # the project's interpreter, reachable from every node (the nodes share this filesystem)
    bringup_seconds: float
    log_dir: Path  # slurmctld.log, slurmd-<node>.log, munged.log, jobcomp.log (every finished job, its state)

    def run(self, *args: str, timeout: float = 30) -> str:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=os.environ)
        if out.returncode:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, script: Path, *options: str) -> str:
        """Submit a batch script; returns the job id."""
        return self.run("sbatch", "--parsable", *options, str(script)).strip().split(";")[0]

    def job_state(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float = 90) -> dict[str, str]:
        """Block until the job ends; returns its `scontrol show job` fields (JobState, ExitCode, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state.get("JobState") in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=os.environ, check=False)
                raise AssertionError(f"job {job_id} still {state.get('JobState')} after {timeout}s: {state}")
            time.sleep(0.5)


def _testbed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(TESTBED), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": SEARCH_PATH},
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root to start the Slurm test bed")
    missing = [tool for tool in TOOLS if shutil.which(tool, path=SEARCH_PATH) is None]
    if missing:
        reason = f"Slurm test bed needs {', '.join(missing)}: apt-get install -y slurm-wlm munge iproute2"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "PATH")}
    # A CI timeout sends SIGTERM, which would end pytest without running the `finally` below.
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    with exclusive_testbed():
        try:
            start = time.monotonic()
            up = _testbed("up", "-n", str(NODES))
            bringup = time.monotonic() - start
            if up.returncode:
                pytest.fail(f"the Slurm test bed did not come up:\n{up.stderr}")
            conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
            assert conf, up.stdout
            os.environ["SLURM_CONF"] = conf.group(1)
            os.environ["PATH"] = SEARCH_PATH
            print(f"\nSlurm test bed up in {bringup:.1f}s", file=sys.stderr)
            yield SlurmCluster(
                conf=Path(conf.group(1)),
                nodes=[f"sgnode{i}" for i in range(1, NODES + 1)],
                node_interface="sgtb0",
                python=sys.executable,
                bringup_seconds=bringup,
                log_dir=Path(conf.group(1)).parents[1] / "log",
            )
        finally:
            # Also after a failed test or Ctrl-C: no daemon, namespace or bridge outlives the session.
            down = _testbed("down")
            signal.signal(signal.SIGTERM, previous_term)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if down.returncode:
                print(f"Slurm test bed teardown failed:\n{down.stderr}", file=sys.stderr)
