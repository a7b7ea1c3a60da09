"""Multi-node launch on the real Slurm test bed: sbatch -> srun -> training.launch -> torch.distributed (gloo)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

# Each task: read its place from Slurm's variables, join the process group over the node's
# own interface, all_reduce, and print one JSON line for the test to read from the job log.
ALLREDUCE = textwrap.dedent(
    """
    import json, os, socket, sys
    import torch
    import torch.distributed as dist
    from training.launch import DistEnv

    env = DistEnv.from_environ(network_interface=sys.argv[1])
    env.init_process_group("gloo", timeout_s=60)
    value = torch.tensor([float(env.rank + 1), 10.0 ** env.rank])
    dist.all_reduce(value)
    print("RESULT " + json.dumps({
        "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
        "node_rank": env.node_rank, "master": f"{env.master_addr}:{env.master_port}",
        "hostname": socket.gethostname(), "slurm_node": os.environ["SLURMD_NODENAME"],
        "gloo_ifname": os.environ["GLOO_SOCKET_IFNAME"], "sum": value.tolist(),
    }), flush=True)
    dist.destroy_process_group()
    """
)


REPO = Path(__file__).resolve().parents[2]


def results(log: Path) -> list[dict]:
    return [json.loads(line[len("RESULT ") :]) for line in log.read_text().splitlines() if line.startswith("RESULT ")]


def test_two_node_allreduce_through_sbatch(slurm_cluster, tmp_path: Path) -> None:
    job_py = tmp_path / "allreduce.py"
    job_py.write_text(ALLREDUCE)
    script = tmp_path / "allreduce.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --time=00:03:00\n"
        f"#SBATCH --output={tmp_path}/slurm-%j.out\n"
        "set -euo pipefail\n"
        f"srun {slurm_cluster.python} {job_py} {slurm_cluster.node_interface}\n"
    )
    job_id = slurm_cluster.sbatch(script, f"--chdir={REPO}")
    state = slurm_cluster.wait(job_id, timeout=90)
    log = tmp_path / f"slurm-{job_id}.out"
    text = log.read_text() if log.exists() else "<no log>"
    assert state["JobState"] == "COMPLETED", f"job {job_id} {state['JobState']} exit {state.get('ExitCode')}:\n{text}"

    ranks = sorted(results(log), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], text
    # Both nodes took part: each rank ran on its own node, under that node's own hostname.
    assert [r["hostname"] for r in ranks] == slurm_cluster.nodes
    assert [r["slurm_node"] for r in ranks] == slurm_cluster.nodes
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["local_rank"] == 0 for r in ranks)
    # The rendezvous is the first node's bridge address, the same for both, and gloo used the veth.
    assert {r["master"].split(":")[0] for r in ranks} == {"10.77.0.11"}
    assert len({r["master"] for r in ranks}) == 1
    assert {r["gloo_ifname"] for r in ranks} == {slurm_cluster.node_interface}
    # all_reduce(sum) of [rank + 1, 10**rank] over ranks 0 and 1.
    assert all(r["sum"] == [3.0, 11.0] for r in ranks)


def test_master_resolves_through_slurm_where_names_do_not(slurm_cluster) -> None:
    # On this host the node names resolve nowhere (no DNS, /etc/hosts untouched): the address
    # must come from Slurm's NodeAddr, which is what the other nodes reach.
    from training.launch import resolve_master

    assert resolve_master(slurm_cluster.nodes[0], multi_node=True) == "10.77.0.11"


def submit_and_wait(slurm_cluster, tmp_path: Path, body: str, *options: str) -> tuple[dict[str, str], str]:
    script = tmp_path / "job.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/slurm-%j.out\n{body}\n")
    job_id = slurm_cluster.sbatch(script, f"--chdir={REPO}", *options)
    state = slurm_cluster.wait(job_id, timeout=60)
    log = tmp_path / f"slurm-{job_id}.out"
    return state, log.read_text() if log.exists() else ""


def test_ranks_of_two_tasks_per_node(slurm_cluster, tmp_path: Path) -> None:
    # 2 nodes x 2 tasks (overcommitting the test bed's one CPU per node): local ranks and node ranks
    # come from Slurm's per-node layout, and every task agrees on one master address and port.
    state, text = submit_and_wait(
        slurm_cluster,
        tmp_path,
        f"srun --ntasks=4 --ntasks-per-node=2 --overcommit {slurm_cluster.python} -m training.launch "
        f"--network-interface {slurm_cluster.node_interface}",
        "--nodes=2",
        "--ntasks-per-node=1",
    )
    assert state["JobState"] == "COMPLETED", text
    tasks = sorted((json.loads(line) for line in text.splitlines() if line.startswith("{")), key=lambda t: t["rank"])
    assert [(t["rank"], t["local_rank"], t["node_rank"], t["hostname"]) for t in tasks] == [
        (0, 0, 0, "sgnode1"),
        (1, 1, 0, "sgnode1"),
        (2, 0, 1, "sgnode2"),
        (3, 1, 1, "sgnode2"),
    ]
    assert {(t["world_size"], t["local_world_size"], t["master_addr"], t["master_port"]) for t in tasks} == {
        (4, 2, "10.77.0.11", tasks[0]["master_port"])
    }


def test_batch_script_without_srun_is_refused(slurm_cluster, tmp_path: Path) -> None:
    # The batch script alone is one process of a 2-task job: starting training there would hang
    # forever waiting for rank 1. It must fail at once and say to use srun.
    state, text = submit_and_wait(
        slurm_cluster, tmp_path, f"{slurm_cluster.python} -m training.launch", "--nodes=2", "--ntasks-per-node=1"
    )
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", (state, text)
    assert "SLURM_NTASKS=2 but this process is the batch script" in text and "srun" in text, text
