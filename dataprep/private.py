"""Files that may hold credentials (the MLflow store, the Slurm config snapshot) are created readable by their
owner only (mode 0600), whatever the umask, so a workdir on a shared file system does not hand them out."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: str | Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600 (an existing file is narrowed to 0600 first)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fd = -1
            fh.write(text)
    finally:
        if fd >= 0:
            os.close(fd)
    return path


def create_private(path: str | Path) -> None:
    """Create an empty file with mode 0600 unless it exists (an existing file keeps the mode its owner chose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        pass


def private_sqlite_store(uri: str) -> None:
    """For a `sqlite:///PATH` tracking URI, create PATH as an empty private file before MLflow opens it.

    SQLite takes an empty file for an empty database, and creates its journal with the database's mode.
    """
    if uri.startswith("sqlite:///") and "?" not in uri:
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            create_private(path)
