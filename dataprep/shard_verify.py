"""Check token shards against their manifest before training trusts them.

`verify_shards(shards_dir, mode, vocab_size)` runs once per process at the start of pretraining:

- `fast`: every listed shard exists with the size the manifest recorded, and its schema metadata (format,
  version, tokenizer, vocabulary, end-of-text id, dtype) is the manifest's; the model's vocabulary holds
  the manifest's.
- `full` (the default): also the sha256 of every shard against the manifest, and the largest token id
  against the model's vocabulary, so a flipped byte stops the run instead of training on it (or ending in
  an IndexError deep inside the embedding).
- `off`: nothing.

Hashing a large shard set is not free, so what `full` found is kept in `manifest.verified.json` beside the
manifest: per shard its size, mtime_ns, sha256 and largest id. A later start (a resume, another rank, a
fine-tune) hashes only the files whose size or mtime changed. The cache records what the files hold, not
what the manifest says, so a hand-edited manifest is still compared against real hashes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dataprep.shards import MANIFEST, META_KEYS, SPLITS, ShardError, file_sha256, read_manifest

VerifyMode = Literal["full", "fast", "off"]
CACHE = "manifest.verified.json"
CACHE_VERSION = 1


@dataclass
class VerifyReport:
    mode: str
    shards: int = 0
    file_bytes: int = 0
    hashed: int = 0  # shards hashed now (the others were unchanged since the cache recorded them)
    hashed_bytes: int = 0
    max_id: int = -1


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(body, dict) or body.get("version") != CACHE_VERSION or not isinstance(body.get("files"), dict):
        return {}
    return body["files"]


def _write_cache(path: Path, files: dict[str, Any]) -> None:
    """Atomically, under a name of this process's own, so ranks verifying at once never see a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": files}, indent=1, sort_keys=True) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only shard folder: verification still ran, only the next start hashes again
        tmp.unlink(missing_ok=True)


def _schema_metadata(path: Path) -> dict[str, str]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path), "r") as source:
            raw = pa.ipc.open_file(source).schema.metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"shard {path} is not a readable Arrow IPC file: {exc}") from None
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}


def _max_token_id(path: Path) -> int:
    """The largest id in a shard, -1 when it holds none. Reads every token (memory-mapped, no copy)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            best = -1
            for i in range(reader.num_record_batches):
                values = reader.get_batch(i).column("input_ids").values
                if len(values):
                    best = max(best, int(np.max(values.to_numpy(zero_copy_only=False))))
            return best
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ShardError(f"shard {path} cannot be read: {exc}") from None


def _check_metadata(path: Path, manifest: dict[str, Any]) -> None:
    meta = _schema_metadata(path)
    expected = {"format": manifest["format"], "version": str(manifest["version"]),
                "tokenizer_sha256": manifest["tokenizer_sha256"], "vocab_size": str(manifest["vocab_size"]),
                "eot_id": str(manifest["eot_id"]), "dtype": manifest["dtype"]}
    for key in META_KEYS:
        if meta.get(key) != expected[key]:
            raise ShardError(f"shard {path}: schema metadata {key} is {meta.get(key)!r}, the manifest says "
                             f"{expected[key]!r}; the shard does not belong to this shard set")


def verify_shards(shards_dir: str | Path, mode: VerifyMode = "full", vocab_size: int | None = None,
                  splits: tuple[str, ...] = SPLITS) -> VerifyReport:
    """Check the shards of `splits` (see the module docstring); a ShardError names the shard, expected and found."""
    report = VerifyReport(mode)
    if mode == "off":
        return report
    if mode not in ("full", "fast"):
        raise ShardError(f"shards.verify is {mode!r}: expected full, fast or off")
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    where = shards_dir / MANIFEST
    if vocab_size is not None and vocab_size < int(manifest["vocab_size"]):
        raise ShardError(f"{where}: the shards were written for a vocabulary of {manifest['vocab_size']} ids, "
                         f"but model.vocab_size is {vocab_size}: ids {vocab_size} and up would have no embedding; "
                         f"set model.vocab_size to at least {manifest['vocab_size']} (or leave it out)")
    limit = vocab_size if vocab_size is not None else int(manifest["vocab_size"])
    cache_path = shards_dir / CACHE
    cache = _read_cache(cache_path) if mode == "full" else {}
    fresh: dict[str, Any] = dict(cache)
    try:
        _verify_splits(shards_dir, manifest, splits, mode, limit, cache, fresh, report)
    finally:  # what was hashed before a failure is kept: the next start hashes only what is still unknown
        if mode == "full" and fresh != cache:
            _write_cache(cache_path, fresh)
    return report


def listed_shard_problem(shards_dir: Path, entry: dict[str, Any]) -> str:
    """Why a shard the manifest lists is not there as listed (missing, or another size), or "": the cheap check."""
    path = shards_dir / entry["path"]
    if not path.is_file():
        return f"{shards_dir / MANIFEST} lists shard {entry['path']}, but {path} is missing"
    size = path.stat().st_size
    if "file_bytes" in entry and size != entry["file_bytes"]:
        return (f"shard {path}: the manifest says {entry['file_bytes']} bytes, the file has {size}; it was "
                f"truncated or replaced")
    return ""


def _verify_splits(shards_dir: Path, manifest: dict[str, Any], splits: tuple[str, ...], mode: str, limit: int,
                   cache: dict[str, Any], fresh: dict[str, Any], report: VerifyReport) -> None:
    for split in splits:
        for entry in manifest["splits"].get(split, {}).get("shards", []):
            rel = entry["path"]
            path = shards_dir / rel
            problem = listed_shard_problem(shards_dir, entry)
            if problem:
                raise ShardError(f"{problem}: re-run `scratchgpt shard CONFIG --force`")
            stat = path.stat()
            report.shards += 1
            report.file_bytes += stat.st_size
            _check_metadata(path, manifest)
            if mode == "fast":
                continue
            known = cache.get(rel)
            if (isinstance(known, dict) and known.get("size") == stat.st_size
                    and known.get("mtime_ns") == stat.st_mtime_ns and "sha256" in known and "max_id" in known):
                actual, max_id = known["sha256"], int(known["max_id"])
            else:
                actual, max_id = file_sha256(path), _max_token_id(path)
                report.hashed += 1
                report.hashed_bytes += stat.st_size
                fresh[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": actual,
                              "max_id": max_id}
            if actual != entry["sha256"]:
                raise ShardError(f"shard {path} is damaged or was changed: the manifest says sha256 "
                                 f"{entry['sha256']}, the file has {actual}; re-run `scratchgpt shard CONFIG --force` "
                                 "(or restore the file)")
            if max_id >= limit:
                raise ShardError(f"shard {path} holds token id {max_id}, outside the model's vocabulary of {limit} "
                                 f"ids (0..{limit - 1}); the shard is damaged or was written for another tokenizer")
            report.max_id = max(report.max_id, max_id)
