"""`scratchgpt runs` against a real `mlflow server` on loopback, over HTTP.

The test starts the venv's `mlflow server` (sqlite backend in tmp_path) on a free port of 127.0.0.1, logs the
same runs as tests/test_runs.py through it, and reads them back with `runs`, `--compare` and `--lineage`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runs import build_store, parse_tables, scratchgpt

START_TIMEOUT_S = 150  # the server imports all of mlflow and migrates the store; slow on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(root: Path, log_path: Path) -> tuple[subprocess.Popen, str] | None:
    """Start `mlflow server` on a free port and wait for /health; None when another process took the port first
    (it is picked here and bound by the server seconds later)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    assert mlflow_bin.is_file(), f"{mlflow_bin} is missing: install the project into its venv (./setup.sh)"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # No job runner: the server then starts one process fewer, and these tests need none.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            if "address already in use" in tail.lower():
                return None
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, uri
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"mlflow server not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    # The server runs uvicorn in a child process: stop the whole session this test started.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    for _ in range(3):
        started = _start_server(root, root / "server.log")
        if started:
            break
    else:
        pytest.fail("mlflow server: 3 free ports in a row were taken before it bound them")
    proc, uri = started
    try:
        yield uri
    finally:
        stop_server(proc)


def test_runs_compare_and_lineage_over_http(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.image

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with mlflow_server(tmp_path) as uri:
        built = build_store(tmp_path, uri)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # build_store's stage runs export it

        rc, out, _ = scratchgpt(capsys, "--tracking-uri", uri, "--experiment", "sweep", "--stage", "pretrain",
                                "--sort", "val_bpb")
        assert rc == 0, out
        assert [r["run"] for r in parse_tables(out)["pretrain"]] == \
            [built.pretrain[i][:8] for i in (2, 1, 0)] + [built.failed[:8]]

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the store from the environment, as mlflow users set it
        rc, out, _ = scratchgpt(capsys, "--experiment", "sweep", "--filter", "params.train.lr = '0.001'")
        assert [r["run"] for r in parse_tables(out)["pretrain"]] == [built.pretrain[0][:8]]

        png = tmp_path / "cmp.png"
        rc, out, _ = scratchgpt(capsys, "--compare", built.pretrain[0][:8], built.pretrain[1][:8], "--out", str(png))
        assert rc == 0, out
        differ = out.split("Params that differ")[1].split("\n\n")[0]
        assert {line.split()[0] for line in differ.splitlines()[3:]} == {"train.lr"}
        assert matplotlib.image.imread(png).shape == (500, 1200, 4)

        rc, out, _ = scratchgpt(capsys, "--lineage", built.pretrain[1], "--json")
        lin = json.loads(out)
        assert lin["shards"]["run"]["run_id"] == built.shard and lin["prep"]["docs_out"] == 90
