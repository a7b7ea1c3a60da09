"""A stage's identity: the config it consumed, the input files it read, and what its upstream stages produced.

    identity = hash(config sections, input files, upstream output digests)

A finished stage records its identity (and the parts it was made of) in its
completion marker. The stage is complete while the identity computed now is
the recorded one; when it differs, `explain` says why ("2 input files changed
since the last run"). Input files are fingerprinted by path, size and content
(sha256, hashed again only when the size or modification time moved; files
over HASH_LIMIT by modification time instead), so touching a file redoes
nothing and editing one redoes its stage and everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.core.stages import STAGES
from pipeline.core.workdir import workdir_of
from pipeline.redact import redact

HASH_LIMIT = 256 * 2**20  # inputs up to this size are content-hashed (about 0.5 s per 256 MB)
HASH_BUDGET = 2 * 2**30  # bytes content-hashed per fingerprint at most: a huge corpus goes by size and mtime
_HASHED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, so one process hashes a file once
_IDENTITIES: dict[tuple[str, str], Identity] = {}  # (config, stage) -> identity, within one outermost compute()


@dataclass
class Identity:
    hash: str
    parts: dict[str, Any] = field(default_factory=dict)
    resume: str = ""  # the identity with the stage's resume_config: equal means the outputs can be continued


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_files(paths: list[str], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """{path: {size, mtime_ns, sha256}} for each file; `previous` lends hashes of files whose size and mtime held."""
    previous = previous or {}
    out: dict[str, Any] = {}
    budget = HASH_BUDGET
    for name in paths:
        if ":" in name and not Path(name).exists():  # builtin:python-docs: the Python that builds it decides
            out[name] = {"builtin": f"python {sys.version_info[0]}.{sys.version_info[1]}"}
            continue
        stat = os.stat(name)
        entry: dict[str, Any] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = previous.get(name) or {}
        if old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns and old.get("sha256"):
            entry["sha256"] = old["sha256"]
        elif stat.st_size <= min(HASH_LIMIT, budget):
            key = (name, stat.st_size, stat.st_mtime_ns)
            if key not in _HASHED:
                _HASHED[key] = file_sha256(Path(name))
                budget -= stat.st_size
            entry["sha256"] = _HASHED[key]
        out[name] = entry
    return out


def _file_key(entry: dict[str, Any]) -> str:
    """What decides 'the same file': its content when hashed, else its size and modification time."""
    if "builtin" in entry:
        return entry["builtin"]
    return f"{entry['size']}:{entry.get('sha256') or entry['mtime_ns']}"


def read_marker(cfg: Config, name: str) -> dict[str, Any] | None:
    return read_json(workdir_of(cfg).marker(name))


def stage_config(cfg: Config, name: str) -> dict[str, Any]:
    stage = STAGES[name]
    custom = stage.hook("identity_config")
    if custom is not None:
        return custom(cfg)
    return cfg.section_dump(*stage.sections)


_depth = [0]  # calls of compute() in progress: the outermost starts with an empty memo


def compute(cfg: Config, name: str) -> Identity:
    """The identity of stage `name` for this config, as of now.

    A stage's identity reads its upstream stages' identities, and theirs, so one call computes each stage once
    (memo) instead of once per path through the graph; every outermost call starts afresh.
    """
    if _depth[0] == 0:
        _IDENTITIES.clear()
    key = (json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str), name)
    _depth[0] += 1
    try:
        if key not in _IDENTITIES:
            _IDENTITIES[key] = _compute(cfg, name)
        return _IDENTITIES[key]
    finally:
        _depth[0] -= 1


def _compute(cfg: Config, name: str) -> Identity:
    stage = STAGES[name]
    marker = read_marker(cfg, name) or read_json(workdir_of(cfg).started(name)) or {}
    consumed = stage_config(cfg, name)
    config_hash = hashlib.sha256(json.dumps(consumed, sort_keys=True).encode()).hexdigest()[:16]
    # settings: the values behind the hash, only so that `explain` can name what changed (not hashed again)
    parts: dict[str, Any] = {"config": config_hash, "settings": settings(consumed), "inputs": {}, "upstream": {}}
    lister = stage.hook("inputs")
    if lister is not None:
        parts["inputs"] = fingerprint_files(lister(cfg), marker.get("parts", {}).get("inputs"))
    for up in stage.upstream:
        parts["upstream"][up] = upstream_digest(cfg, up)
    rest = {"inputs": {k: _file_key(v) for k, v in parts["inputs"].items()}, "upstream": parts["upstream"]}
    ident = Identity(_digest({"config": config_hash, **rest}), parts)
    resumable = stage.hook("resume_config")
    ident.resume = _digest({"config": _digest(resumable(cfg)), **rest}) if resumable else ident.hash
    return ident


def settings(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'train.lr': '0.003', 'data.sources.0.weight': '0.7', ...}: a config's leaves, the way overrides name them."""
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix[:-1]: redact(json.dumps(tree, ensure_ascii=False, default=str))}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(settings(value, f"{prefix}{key}."))
    return out


def changed_settings(before: dict[str, str], after: dict[str, str], shown: int = 3) -> str:
    """'train.lr 0.003 -> 0.001, model.n_layer 4 -> 6' for the keys whose values differ, at most `shown`."""
    def short(value: str | None) -> str:
        if value is None:
            return "(unset)"
        return value if len(value) <= 40 else value[:37] + "..."

    keys = [k for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k)]
    text = ", ".join(f"{k} {short(before.get(k))} -> {short(after.get(k))}" for k in keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def upstream_digest(cfg: Config, name: str) -> str:
    """What a finished upstream stage produced (its marker's digest), or 'pending' with the identity it will have."""
    marker = read_marker(cfg, name)
    current = compute(cfg, name)
    if marker is not None and marker.get("hash") == current.hash:
        return f"{current.hash}:{marker.get('digest', '')}"
    return f"pending:{current.hash}"


def explain(old: dict[str, Any] | None, new: Identity, sections: tuple[str, ...]) -> str:
    """Why a stage recorded with `old` parts must run again, in words."""
    if not old:
        return ""
    before = old.get("parts") or {}
    reasons: list[str] = []
    if before.get("config") != new.parts["config"]:
        changed = changed_settings(before.get("settings") or {}, new.parts.get("settings") or {})
        # markers written before `settings` was recorded can only say which sections
        reasons.append(f"the config changed: {changed}" if before.get("settings") and changed
                       else f"the config ({', '.join(sections)}) changed")
    old_inputs, new_inputs = before.get("inputs") or {}, new.parts["inputs"]
    added = [p for p in new_inputs if p not in old_inputs]
    removed = [p for p in old_inputs if p not in new_inputs]
    edited = [p for p in new_inputs if p in old_inputs and _file_key(old_inputs[p]) != _file_key(new_inputs[p])]
    # A file moved to another folder is "added" and "removed" under one name: those two show their paths.
    moved = {Path(n).name for n in added} & {Path(n).name for n in removed}
    for count, what, names in ((len(added), "added", added), (len(removed), "removed", removed),
                               (len(edited), "changed", edited)):
        if count:
            labels = [n if Path(n).name in moved else Path(n).name for n in names[:3]]
            shown = ", ".join(labels) + (", ..." if count > 3 else "")
            reasons.append(f"{count} input file{'s' if count > 1 else ''} {what} since the last run ({shown})")
    for up, digest in new.parts["upstream"].items():
        if (before.get("upstream") or {}).get(up) != digest:
            reasons.append(f"the {up} stage's output changed")
    return "; ".join(reasons) or "its identity changed"
