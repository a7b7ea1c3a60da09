"""Checkpoints that prove they are whole: per-file sha256, a resume that skips damaged ones, and states whose
loss was not finite never called good.

Each checkpoint's `scratchgpt.json` records the sha256 of every file in its folder (rank 0 hashes them after
the barrier that ends the save). A resume checks the checkpoint `latest` names; when a file is missing,
truncated or differs from its hash, it goes back to the newest older checkpoint that is intact, says which
file was damaged, and points `latest` there. Only when none is intact does it stop.

The NaN guard calls `reject_nonfinite`: the state the bad step started from produced that loss, so a
checkpoint of it is marked bad (`"bad"` in its metadata) and `latest` moves back to the one before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataprep.shards import file_sha256
from training.checkpoint import LATEST, META, CheckpointError, _atomic_write, read_meta, tag_for

TAG = re.compile(r"step_\d{8}")
# DeepSpeed copies these into every checkpoint folder; zero_to_fp32.py unpickles without restriction.
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
RECOVERY_README = "README-zero_to_fp32.txt"


def file_hashes(tag_dir: Path, names: list[str] | dict[str, Any]) -> dict[str, str]:
    return {name: file_sha256(tag_dir / name) for name in names}


def verify(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """The metadata of an intact, good checkpoint; a CheckpointError naming the damaged file otherwise."""
    tag_dir = Path(ckpt_dir) / tag
    meta = read_meta(ckpt_dir, tag)  # presence and sizes
    if meta.get("bad"):
        raise CheckpointError(f"checkpoint {tag_dir} holds a state whose loss was not finite ({meta['bad']})")
    for name, expected in meta.get("sha256", {}).items():
        actual = file_sha256(tag_dir / name)
        if actual != expected:
            raise CheckpointError(f"checkpoint file {tag_dir / name} is damaged: sha256 {actual}, "
                                  f"{expected} was written")
    return meta


def _step_tags(ckpt_dir: Path) -> list[str]:
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name)), reverse=True)


def resume_tag(ckpt_dir: str | Path, is_main: bool = True,
               say: Callable[[str], None] = lambda text: print(text, flush=True)) -> str | None:
    """The checkpoint to resume from: `latest` if intact, else the newest intact one before it.

    None when there is no `latest` (a fresh start). On rank 0 (`is_main`) a fallback is reported and
    `latest` rewritten. Every rank of a job calls it; under torch.distributed rank 0 decides for all.
    """
    return _agreed(lambda: _choose(Path(ckpt_dir), is_main, say), is_main)


def _choose(ckpt_dir: Path, is_main: bool, say: Callable[[str], None]) -> str | None:
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    named = latest.read_text(encoding="utf-8").strip()
    older = [t for t in _step_tags(ckpt_dir) if not TAG.fullmatch(named) or t < named]
    problems: list[str] = []
    for tag in [named, *older] if named else older:
        try:
            verify(ckpt_dir, tag)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems and is_main:
            say(f"[pretrain] {'; '.join(problems)}. Resuming from the newest intact checkpoint, {ckpt_dir / tag}")
            _atomic_write(latest, tag)
        return tag
    raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: {'; '.join(problems) or 'latest is empty'}",
                          hint=f"restore the damaged file, or move {ckpt_dir} aside to train from step 0")


def _agreed(choose: Callable[[], str | None], is_main: bool) -> str | None:
    """Rank 0's answer on every rank (one hashing pass, one decision)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return choose()
    box: list[Any] = [None]
    if is_main:
        try:
            box = [("ok", choose(), "")]
        except CheckpointError as exc:
            box = [("error", str(exc), exc.hint)]
    dist.broadcast_object_list(box, src=0)
    kind, value, hint = box[0]
    if kind == "error":
        raise CheckpointError(value, hint=hint)
    return value


def reject_nonfinite(ckpt_dir: str | Path, step: int, loss: float, is_main: bool) -> str | None:
    """The state after `step` gave a non-finite loss: mark a checkpoint of it bad, move `latest` back.

    Returns the newest checkpoint that is still good (None when there is none). Called on every rank.
    """
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / tag_for(step) / META
    if is_main and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["bad"] = f"loss {loss} at step {step + 1}"
        _atomic_write(meta_path, json.dumps(meta, indent=2))
        good = next((t for t in _step_tags(ckpt_dir) if t < tag_for(step) and _is_good(ckpt_dir, t)), None)
        if good is None:
            (ckpt_dir / LATEST).unlink(missing_ok=True)
        else:
            _atomic_write(ckpt_dir / LATEST, good)
    if dist.is_initialized():
        dist.barrier()
    latest = ckpt_dir / LATEST
    return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None


def _is_good(ckpt_dir: Path, tag: str) -> bool:
    try:
        return not read_meta(ckpt_dir, tag).get("bad")
    except CheckpointError:
        return False


def drop_recovery_scripts(ckpt_dir: str | Path) -> None:
    """Replace DeepSpeed's zero_to_fp32.py (full pickle) by a note pointing at `scratchgpt export`."""
    ckpt_dir = Path(ckpt_dir)
    found = False
    for name in RECOVERY_SCRIPTS:
        script = ckpt_dir / name
        if script.exists():
            script.unlink()
            found = True
    if found and not (ckpt_dir / RECOVERY_README).exists():
        (ckpt_dir / RECOVERY_README).write_text(
            "DeepSpeed's zero_to_fp32.py was removed from this folder: it loads checkpoints with unrestricted\n"
            "pickle. To get full fp32 weights (a Hugging Face folder), run\n\n"
            "    scratchgpt export <this folder>     (or one checkpoint in it: <this folder>/step_...)\n\n"
            "which reads the ZeRO partitions with torch.load(weights_only=True).\n", encoding="utf-8")
