"""training.launch: ranks and rendezvous from torchrun's or Slurm's variables (no cluster needed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from training.launch import (
    PORT_BASE,
    PORT_SPAN,
    DistEnv,
    LaunchError,
    derive_port,
    expand_hostlist,
    expand_tasks_per_node,
)


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("sgnode1", ["sgnode1"]),
        ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
        ("gpu[08-11],login1", ["gpu08", "gpu09", "gpu10", "gpu11", "login1"]),
        ("a,b[2],c", ["a", "b2", "c"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("10.0.0.1,10.0.0.2", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_expand_hostlist(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    ("text", "message"),
    [("node[1-", r"'\[' without '\]'"), ("node[3-1]", "backwards"), ("node[a]", "bad range"), ("a,,b", "empty")],
)
def test_expand_hostlist_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_hostlist(text)


def test_expand_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="bad entry"):
        expand_tasks_per_node("2(3)")


def test_no_launcher_is_one_process() -> None:
    dist = DistEnv.from_environ({})
    assert (dist.rank, dist.world_size, dist.local_rank, dist.launcher) == (0, 1, 0, "single")
    assert not dist.is_distributed and dist.is_main


TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29411",
}


def test_torchrun_variables() -> None:
    dist = DistEnv.from_environ(TORCHRUN)
    assert dist == DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="10.0.0.7",
        master_port=29411,
        node_rank=1,
        launcher="torchrun",
    )


def test_torchrun_wins_over_slurm() -> None:
    # torchrun started inside a Slurm allocation: its own variables describe the processes.
    env = {**TORCHRUN, "SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}
    assert DistEnv.from_environ(env).launcher == "torchrun"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RANK": "4"}, r"RANK=4 is outside 0\.\.WORLD_SIZE-1"),
        ({"WORLD_SIZE": None}, "WORLD_SIZE not set"),
        ({"MASTER_ADDR": None}, "WORLD_SIZE=4 but MASTER_ADDR not set"),
        ({"MASTER_PORT": None, "LOCAL_RANK": None}, "LOCAL_RANK, MASTER_PORT not set"),
        ({"LOCAL_RANK": "2"}, r"LOCAL_RANK=2 is outside 0\.\.LOCAL_WORLD_SIZE-1"),
        ({"RANK": "three"}, "RANK='three' is not an integer"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ],
)
def test_torchrun_inconsistent(change: dict[str, str | None], message: str) -> None:
    env = {k: v for k, v in {**TORCHRUN, **change}.items() if v is not None}
    with pytest.raises(LaunchError, match=message):
        DistEnv.from_environ(env)


def srun_env(**change: str | None) -> dict[str, str]:
    """Task 1 of 4 in an `srun` step over two nodes, 2 tasks each; addresses as names so nothing is looked up."""
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "10.9.0.[11-12]",
        "SLURM_STEP_NODELIST": "10.9.0.[11-12]",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    }
    env.update(change)
    return {k: v for k, v in env.items() if v is not None}


def test_slurm_variables() -> None:
    dist = DistEnv.from_environ(srun_env())
    assert dist == DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="10.9.0.11",
        master_port=derive_port(1234, 0),
        node_rank=1,
        launcher="slurm",
    )


def test_slurm_falls_back_to_job_variables() -> None:
    # Older Slurm or a hand-made environment: only the job-level variables.
    env = srun_env(SLURM_STEP_NUM_TASKS=None, SLURM_STEP_NODELIST=None, SLURM_STEP_TASKS_PER_NODE=None)
    env["SLURM_TASKS_PER_NODE"] = "2(x2)"
    dist = DistEnv.from_environ(env)
    assert (dist.world_size, dist.master_addr, dist.local_world_size) == (4, "10.9.0.11", 2)


def test_slurm_master_overrides() -> None:
    dist = DistEnv.from_environ(srun_env(MASTER_ADDR="192.168.5.5", MASTER_PORT="23456"))
    assert (dist.master_addr, dist.master_port) == ("192.168.5.5", 23456)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is outside 0\.\.SLURM_STEP_NUM_TASKS/SLURM_NTASKS-1"),
        ({"SLURM_NODEID": "2"}, r"SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE='2\(x2\)' lists 2 nodes"),
        ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST are not set"),
        ({"SLURM_STEP_NODELIST": "node[1-"}, "SLURM_STEP_NODELIST='node\\[1-': '\\[' without '\\]'"),
        ({"SLURM_STEP_ID": None}, "SLURM_NTASKS=4 but this process is the batch script.*srun"),
        ({"SLURM_JOB_ID": "x"}, "SLURM_JOB_ID='x' is not an integer"),
    ],
)
def test_slurm_inconsistent(change: dict[str, str | None], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        DistEnv.from_environ(srun_env(**change))


def test_slurm_batch_script_of_one_task_is_one_process() -> None:
    env = srun_env(SLURM_STEP_ID=None, SLURM_STEP_NUM_TASKS=None, SLURM_NTASKS="1", SLURM_PROCID="0")
    dist = DistEnv.from_environ(env)
    assert (dist.rank, dist.world_size) == (0, 1)


def test_multi_node_master_on_loopback_is_refused() -> None:
    # A first host that resolves to 127.x (a classic /etc/hosts entry) cannot be reached from the other nodes.
    env = srun_env(SLURM_STEP_NODELIST="localhost,10.9.0.12", SLURM_JOB_NODELIST="localhost,10.9.0.12")
    with pytest.raises(LaunchError, match="'localhost', the first host of SLURM_STEP_NODELIST, resolves to the loop"):
        DistEnv.from_environ(env)


def test_single_node_master_may_be_loopback() -> None:
    env = srun_env(
        SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost", SLURM_NODEID="0",
        SLURM_STEP_TASKS_PER_NODE="4",
    )
    assert DistEnv.from_environ(env).master_addr in {"127.0.0.1", "::1"}


def test_derived_port_is_deterministic_and_in_range() -> None:
    ports = {derive_port(job, step) for job in range(1, 3000) for step in range(3)}
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert derive_port(77, 0) == derive_port(77, 0)
    assert derive_port(77, 0) != derive_port(77, 1)  # two steps of one job at once
    assert derive_port(77, 0) != derive_port(78, 0)


def test_apply_to_environ_sets_what_torch_and_deepspeed_read() -> None:
    environ: dict[str, str] = {}
    DistEnv.from_environ(srun_env(), network_interface="lo").apply_to_environ(environ)
    assert environ == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "10.9.0.11",
        "MASTER_PORT": str(derive_port(1234, 0)),
        "GLOO_SOCKET_IFNAME": "lo",
        "NCCL_SOCKET_IFNAME": "lo",
    }
    # What was applied reads back as the same process.
    assert DistEnv.from_environ(environ).rank == 3


def test_network_interface_comes_from_the_config() -> None:
    from pipeline.config import load_config

    cfg = load_config(None, ["slurm.network_interface=lo"])
    environ: dict[str, str] = {}
    DistEnv.from_config(cfg, {}).apply_to_environ(environ)
    assert (environ["GLOO_SOCKET_IFNAME"], environ["NCCL_SOCKET_IFNAME"]) == ("lo", "lo")
    # Not configured: the variables are left alone, for the user's own environment to decide.
    environ = {}
    DistEnv.from_config(load_config(None), {}).apply_to_environ(environ)
    assert "GLOO_SOCKET_IFNAME" not in environ


def test_unknown_network_interface_is_named() -> None:
    dist = DistEnv.from_environ({}, network_interface="ib7")
    with pytest.raises(LaunchError, match=r"network interface ib7 \(slurm.network_interface.*it has: .*lo"):
        dist.apply_to_environ({})


def launcher_free_env() -> dict[str, str]:
    """This environment without Slurm's variables or torchrun's rank and rendezvous ones: as started by hand."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}


def test_cli_prints_the_environment_as_json() -> None:
    env = launcher_free_env()
    env.update(srun_env())
    out = subprocess.run(
        [sys.executable, "-m", "training.launch"], env=env, capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(out)
    assert (info["rank"], info["world_size"], info["launcher"]) == (3, 4, "slurm")
    bad = subprocess.run(
        [sys.executable, "-m", "training.launch"], env={**env, "SLURM_PROCID": "9"}, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "SLURM_PROCID=9" in bad.stderr


def test_a_lone_process_binds_no_port() -> None:
    """Two one-process runs at once on one machine must not collide: a lone process's group needs no rendezvous,
    so it starts even when the MASTER_PORT its shell exports is taken (here, by this test)."""
    env = launcher_free_env()
    code = ("import torch; from training.engine import init_distributed; d = init_distributed(); "
            "t = torch.ones(1); torch.distributed.all_reduce(t); print(d.world_size, int(t.item()))")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env["MASTER_PORT"] = str(taken.getsockname()[1])
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["1", "1"]
