"""The workdir lock: one run at a time writes a workdir.

`<workdir>/scratchgpt.lock` is held with `flock` for as long as a stage runs and
says who holds it (host, pid, command, since when). A second run stops at once
with `WorkdirLocked`, naming the holder. The kernel drops the flock when its
process dies, so a lock file left by a dead process is simply taken over; the
run says so, naming the process that left it. Within one process the lock is
re-entrant (`scratchgpt run` holds it across its stages); a forked child does not
hold it, so a worker left behind by a killed run cannot keep the workdir locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dataprep.errors import ScratchgptError
from training.launch import pid_alive


class WorkdirLocked(ScratchgptError):
    """Another live run holds the workdir."""

    hint = "wait for it to finish (or stop it); `scratchgpt status` and `scratchgpt runs` work meanwhile"


_held: dict[Path, tuple[int, int]] = {}  # lock path -> (fd, depth) held by this process


def _drop_inherited_locks() -> None:
    """In a forked child (datatrove's worker pool and its Manager server): close the inherited lock descriptors.
    A child that outlives its killed parent would otherwise keep the workdir locked for good; the flock stays
    held by the parent's own descriptor while the parent lives."""
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, "
            f"stage {holder.get('stage')}, since {since}")


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


@contextlib.contextmanager
def workdir_lock(path: Path, stage: str) -> Iterator[None]:
    """Hold the lock at `path` while the block runs; raise WorkdirLocked when a live process holds it."""
    path = Path(path).resolve()
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[path]
            _held[path] = (fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise WorkdirLocked(f"the filesystem of {path.parent} does not support file locks (flock: "
                                f"{exc.strerror}); put the workdir on one that does (a Lustre mount needs the "
                                "`flock` option)", hint="") from None
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = read_holder(path)
        who = describe(holder) if holder else "another process (it has not written its name yet)"
        raise WorkdirLocked(f"the workdir {path.parent} is in use by {who} ({path})") from None
    previous = read_holder(path)
    if previous and previous.get("pid") != os.getpid():
        # We got the flock, so the process that wrote this is gone (or on another host and finished).
        gone = previous.get("host") != socket.gethostname() or not pid_alive(int(previous.get("pid", 0)))
        if gone:
            print(f"[{stage}] warning: took over a stale workdir lock left by {describe(previous)}",
                  file=sys.stderr, flush=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:500],
          "stage": stage, "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[path] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held.pop(path)
        os.ftruncate(fd, 0)  # an empty file: nobody holds it
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
