"""Who am I in a distributed run? Ranks, world size and the rendezvous address from the environment.

Three ways a process can be started, tried in this order:

1. torchrun (or any launcher that sets ``RANK`` and ``WORLD_SIZE``): ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` as they are.
2. ``srun`` inside a Slurm job: ``SLURM_PROCID`` is the rank, ``SLURM_STEP_NUM_TASKS`` (else
   ``SLURM_NTASKS``) the world size, ``SLURM_LOCALID`` the local rank, ``SLURM_NODEID`` the node rank.
   The master is the first host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``), resolved to
   an address the other nodes can reach; the port is derived from ``SLURM_JOB_ID`` and
   ``SLURM_STEP_ID``. ``MASTER_ADDR`` / ``MASTER_PORT``, when set, win over the derived values.
3. Neither: one process, rank 0 of 1.

`DistEnv.apply_to_environ()` writes the torchrun variables back, so that
``torch.distributed.init_process_group("env://")`` and ``deepspeed.init_distributed()`` find them,
and sets ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` when a network interface is configured
(``slurm.network_interface``): the interface the collectives use between nodes.

``python -m training.launch`` prints what a process would get, as JSON (handy inside ``srun``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dataprep.errors import ScratchgptError

# Ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): above the well-known
# and Slurm's own ports (6817/6818), below Linux's ephemeral range (32768+), so a derived port
# does not collide with a socket the kernel handed out to someone else.
PORT_BASE = 20000
PORT_SPAN = 10000
DEFAULT_PORT = 29500  # torchrun's default, for a single process


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a process we may not signal still runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LaunchError(ScratchgptError, RuntimeError):
    """The environment does not describe a usable distributed run; the message names the variables."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    node_rank: int = 0
    launcher: str = "single"  # "torchrun", "slurm" or "single"
    network_interface: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, network_interface: str | None = None
    ) -> DistEnv:
        """Read the environment (``os.environ`` by default); raise `LaunchError` when it is inconsistent."""
        env = os.environ if environ is None else environ
        if "RANK" in env or "WORLD_SIZE" in env:
            dist = _from_torchrun(env)
        elif "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
            dist = _from_slurm(env)
        else:
            dist = cls()
        if network_interface:
            dist = cls(**{**asdict(dist), "network_interface": network_interface})
        _check(dist)
        return dist

    @classmethod
    def from_config(cls, cfg: Any, environ: Mapping[str, str] | None = None) -> DistEnv:
        """`from_environ` with the interface of ``slurm.network_interface`` (None: gloo/NCCL choose)."""
        return cls.from_environ(environ, network_interface=cfg.slurm.network_interface)

    def apply_to_environ(self, environ: dict[str, str] | None = None) -> None:
        """Set the variables torch.distributed and DeepSpeed read (``env://``), and the socket interface."""
        env = os.environ if environ is None else environ
        env["RANK"] = str(self.rank)
        env["WORLD_SIZE"] = str(self.world_size)
        env["LOCAL_RANK"] = str(self.local_rank)
        env["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        env["GROUP_RANK"] = str(self.node_rank)
        env["MASTER_ADDR"] = self.master_addr
        env["MASTER_PORT"] = str(self.master_port)
        if self.network_interface:
            check_interface(self.network_interface)
            env["GLOO_SOCKET_IFNAME"] = self.network_interface
            env["NCCL_SOCKET_IFNAME"] = self.network_interface

    def init_process_group(self, backend: str | None = None, timeout_s: float = 300) -> None:
        """Apply to the environment and start torch.distributed (gloo on CPU, nccl on GPU by default)."""
        import datetime

        import torch
        import torch.distributed as tdist

        self.apply_to_environ()
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in env]
    if missing:
        raise LaunchError(
            f"{' and '.join(missing)} not set: RANK and WORLD_SIZE must be set together (torchrun sets both)"
        )
    world = _int(env, "WORLD_SIZE")
    if world > 1:
        missing = [name for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise LaunchError(f"WORLD_SIZE={world} but {', '.join(missing)} not set (torchrun sets them)")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    rank = _int(env, "RANK")
    group_rank_var = "GROUP_RANK" if "GROUP_RANK" in env else "NODE_RANK"
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", 0),
        local_world_size=local_world,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
        node_rank=_int(env, group_rank_var, rank // max(local_world, 1)),
        launcher="torchrun",
    )


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    in_step = "SLURM_STEP_ID" in env
    world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS", 1)
    if not in_step:
        # The batch script itself: SLURM_NTASKS counts the tasks of the whole job, but only
        # this one process runs. Pretending to be rank 0 of N would hang waiting for the rest.
        if world > 1:
            raise LaunchError(
                f"SLURM_NTASKS={world} but this process is the batch script, not a task of a job step "
                "(SLURM_STEP_ID is not set): start it with `srun`"
            )
        return DistEnv(launcher="slurm")
    nodelist_var = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    nodelist = env.get(nodelist_var)
    if world > 1 and not nodelist:
        raise LaunchError("SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are not set: no node to take as master")
    try:
        hosts = expand_hostlist(nodelist) if nodelist else [socket.gethostname()]
    except ValueError as exc:
        raise LaunchError(f"{nodelist_var}={nodelist!r}: {exc}") from None
    node_rank = _int(env, "SLURM_NODEID", 0)
    tasks_var = "SLURM_STEP_TASKS_PER_NODE" if env.get("SLURM_STEP_TASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
    local_world = 1
    if env.get(tasks_var):
        try:
            per_node = expand_tasks_per_node(env[tasks_var])
        except ValueError as exc:
            raise LaunchError(f"{tasks_var}={env[tasks_var]!r}: {exc}") from None
        if node_rank >= len(per_node):
            raise LaunchError(
                f"SLURM_NODEID={node_rank} but {tasks_var}={env[tasks_var]!r} lists {len(per_node)} nodes"
            )
        local_world = per_node[node_rank]
    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    else:
        master_addr = resolve_master(hosts[0], multi_node=len(hosts) > 1, nodelist_var=nodelist_var)
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    else:
        port = derive_port(_int(env, "SLURM_JOB_ID"), _int(env, "SLURM_STEP_ID", 0))
    return DistEnv(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=local_world,
        master_addr=master_addr,
        master_port=port,
        node_rank=node_rank,
        launcher="slurm",
    )


def _check(dist: DistEnv) -> None:
    names = {
        "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS/SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
    }.get(dist.launcher, ("rank", "world size", "local rank", "local world size"))
    rank, world, local_rank, local_world = names
    if dist.world_size < 1:
        raise LaunchError(f"{world}={dist.world_size}: must be at least 1")
    if not 0 <= dist.rank < dist.world_size:
        raise LaunchError(f"{rank}={dist.rank} is outside 0..{world}-1 (={dist.world_size - 1})")
    if dist.local_world_size < 1 or dist.local_world_size > dist.world_size:
        raise LaunchError(f"{local_world}={dist.local_world_size} must be in 1..{world} (={dist.world_size})")
    if not 0 <= dist.local_rank < dist.local_world_size:
        raise LaunchError(
            f"{local_rank}={dist.local_rank} is outside 0..{local_world}-1 (={dist.local_world_size - 1})"
        )
    if not 0 < dist.master_port < 65536:
        raise LaunchError(f"MASTER_PORT={dist.master_port} is not a TCP port")


def derive_port(job_id: int, step_id: int = 0) -> int:
    """A rendezvous port every task of a job step computes alike, and that differs between
    concurrent steps of one job and (mostly) between jobs sharing a first node."""
    return PORT_BASE + (job_id * 16 + step_id % 16) % PORT_SPAN


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist syntax, e.g. ``gpu[01-03,7],login1`` -> gpu01 gpu02 gpu03 gpu7 login1.

    Bracket groups may repeat within a name (``r[1-2]n[1-2]``); zero padding follows the lower bound.
    """
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        if not item:
            raise ValueError("empty host name in the list")
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested '[' in a host name")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '['")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("'[' without ']'")
    items.append(text[start:])
    return items


def _expand_one(item: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_one(rest)
    names = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(f"bad range {part!r} in [{body}]")
        lo_text, hi_text = match.group(1), match.group(2) or match.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"range {part!r} runs backwards")
        width = len(lo_text) if lo_text.startswith("0") else 0
        for number in range(lo, hi + 1):
            names.extend(f"{prefix}{number:0{width}d}{tail}" for tail in tails)
    return names


def expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` syntax, e.g. ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"bad entry {part!r} (expected N or N(xM))")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _lookup(name: str) -> str | None:
    """The first address of a name, IPv4 first (what gloo and NCCL handle best)."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0] if infos else None


def _slurm_node_addr(host: str) -> str | None:
    """``NodeAddr`` of a node as Slurm knows it: how Slurm itself reaches the node."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        out = subprocess.run(
            [scontrol, "show", "node", host, "-o"], capture_output=True, text=True, timeout=15, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match.group(1) if match else None


def resolve_master(host: str, multi_node: bool, nodelist_var: str = "SLURM_JOB_NODELIST") -> str:
    """The address of `host` that the other nodes can reach.

    Name resolution first (local and cheap on every rank); when the name does not resolve, or resolves
    to loopback while the job spans several nodes, Slurm's own ``NodeAddr`` for the node.
    """
    addr = _lookup(host)
    if addr is None or (multi_node and _is_loopback(addr)):
        node_addr = _slurm_node_addr(host)
        if node_addr is not None:
            addr = _lookup(node_addr) or addr
    if addr is None:
        raise LaunchError(
            f"cannot resolve {host!r}, the first host of {nodelist_var}, and `scontrol show node` gives no "
            "NodeAddr for it: set MASTER_ADDR to an address of that node"
        )
    if multi_node and _is_loopback(addr):
        raise LaunchError(
            f"{host!r}, the first host of {nodelist_var}, resolves to the loopback address {addr}, which the other "
            "nodes cannot reach (check /etc/hosts on the nodes), or set MASTER_ADDR"
        )
    return addr


def check_interface(names: str) -> None:
    """Fail here, naming what exists, rather than deep inside gloo or NCCL.

    `names` is one interface name or a comma-separated list; gloo wants exact names, so each must exist.
    """
    available = [ifname for _, ifname in socket.if_nameindex()]
    absent = [name for name in names.split(",") if name.strip() not in available]
    if absent:
        raise LaunchError(
            f"network interface {', '.join(absent)} (slurm.network_interface, GLOO_SOCKET_IFNAME) does not exist on "
            f"{socket.gethostname()}; it has: {', '.join(available)}"
        )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--network-interface", help="interface for gloo/NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")
    args = parser.parse_args(argv)
    try:
        dist = DistEnv.from_environ(network_interface=args.network_interface)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info: dict[str, Any] = {**asdict(dist), "hostname": socket.gethostname()}
    print(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
