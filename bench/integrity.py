"""What integrity checks cost: full shard verification at pretraining start-up, and hashing each checkpoint.

    .venv/bin/python bench/integrity.py [--config bench/pretrain_shakespeare.yaml] [--synthetic-mb 256]
                                        [--rounds 3] [KEY.PATH=VALUE ...]

The shared data (Tiny Shakespeare, as bench/pretrain.py cuts it) goes through the real prep, tokenizer and shard
stages first (not timed). Prints one JSON line per figure:

- `shard_verify_seconds_per_gb`: `shards.verify: full` with nothing cached (sha256 + largest token id of every
  shard) on a synthetic shard set of --synthetic-mb MB of random tokens, written just before, so the files are
  in the page cache: this is the CPU cost; a cold disk adds its read time. Also the sha256 pass alone.
- `shard_verify_startup_share`: `verify_seconds`, full verification of the shared data's shards with nothing
  cached, as a share of the pretrain start-up (`pipeline.stages.pretrain.build`: model, DeepSpeed engine,
  loaders; after one untimed build that imports DeepSpeed); and the start-up itself with `shards.verify: off`
  against `full` (no cache), `fast` and `full` with the cache a restart finds, alternated in this process so
  all see the same machine load (medians over --rounds; differences this small are within the noise).
- `checkpoint_hash_share`: seconds to sha256 every file of a checkpoint, against the whole `save` (DeepSpeed's
  write + hashing + metadata), for the config's model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def emit(figure: str, **values: Any) -> None:
    print(json.dumps({"figure": figure, **values}), flush=True)


def shakespeare_config(config: Path, folder: Path, overrides: list[str]) -> Any:
    """The bench config on nanoGPT's split of Tiny Shakespeare, prep/tokenizer/shard run through the stages."""
    from pipeline.config import load_config
    from pipeline.core.runner import run_stage

    data = SHAKESPEARE.read_bytes()
    cut = int(len(data) * 0.9)
    (folder / "train.txt").write_bytes(data[:cut])
    (folder / "val.txt").write_bytes(data[cut:])
    cfg = load_config(config, [f"workdir={folder / 'work'}", f"data.inputs=[{folder / 'train.txt'}]",
                               f"data.val_inputs=[{folder / 'val.txt'}]", "train.sample_tokens=0", *overrides])
    for name in ("prep", "tokenizer", "shard"):
        with contextlib.redirect_stdout(sys.stderr):
            run_stage(cfg, name)
    return cfg


def synthetic_shards(folder: Path, megabytes: int) -> int:
    """Random uint16 tokens in 64 MB shards through the real writer; returns the bytes on disk."""
    import numpy as np

    from dataprep.shards import ShardWriter, build_manifest, pack_documents, shard_metadata, write_manifest

    meta = shard_metadata("f" * 64, 50257, 0)
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, "train", "bench", meta, max_shard_bytes=64 * 2**20)
    doc_tokens = 2048
    for _ in range(megabytes * 2**20 // (2 * doc_tokens * 256)):
        docs = [rng.integers(1, 50257, doc_tokens, dtype=np.uint16) for _ in range(256)]
        writer.write(pack_documents(docs, [4 * doc_tokens] * len(docs), 0, meta["dtype"]))
    write_manifest(folder, build_manifest(meta, {"train": writer.close()}))
    return sum(p.stat().st_size for p in (folder / "train").glob("*.arrow"))


def shard_cost(folder: Path, megabytes: int, rounds: int) -> None:
    from dataprep.shard_verify import CACHE, verify_shards
    from dataprep.shards import file_sha256

    size = synthetic_shards(folder, megabytes)
    full, sha = [], []
    for _ in range(rounds):
        (folder / CACHE).unlink(missing_ok=True)
        started = time.perf_counter()
        verify_shards(folder, "full", splits=("train",))
        full.append(time.perf_counter() - started)
        started = time.perf_counter()
        for path in sorted((folder / "train").glob("*.arrow")):
            file_sha256(path)
        sha.append(time.perf_counter() - started)
    started = time.perf_counter()
    report = verify_shards(folder, "full", splits=("train",))  # everything cached now
    cached = time.perf_counter() - started
    gb = size / 1e9
    emit("shard_verify_seconds_per_gb", full=round(statistics.median(full) / gb, 3),
         sha256_only=round(statistics.median(sha) / gb, 3), cached_restart_seconds=round(cached, 4),
         hashed_on_restart=report.hashed, gigabytes=round(gb, 3), page_cache="warm (files just written)")


def startup_share(cfg: Any, rounds: int) -> dict[str, Any]:
    from dataprep.shard_verify import CACHE, verify_shards
    from pipeline.stages.pretrain import build

    shards = Path(cfg.workdir) / "shards"
    times: dict[str, list[float]] = {"off": [], "fast": [], "full": [], "full_cached": []}
    with contextlib.redirect_stdout(sys.stderr):
        setup = build(cfg)  # not timed: the first build imports DeepSpeed and warms every cache
    verify_alone = []
    for _ in range(rounds):
        (shards / CACHE).unlink(missing_ok=True)
        started = time.perf_counter()
        verify_shards(shards, "full", vocab_size=setup.gcfg.vocab_size)
        verify_alone.append(time.perf_counter() - started)
    for _ in range(rounds):
        for mode in times:
            if mode == "full":
                (shards / CACHE).unlink(missing_ok=True)
            started = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                setup = build(cfg.model_copy(update={"shards": cfg.shards.model_copy(
                    update={"verify": mode.removesuffix("_cached")})}))
            times[mode].append(time.perf_counter() - started)
    med = {mode: statistics.median(t) for mode, t in times.items()}
    shard_bytes = sum(p.stat().st_size for p in shards.rglob("*.arrow"))
    emit("shard_verify_startup_share", verify_seconds=round(statistics.median(verify_alone), 4),
         verify_share_of_startup=round(statistics.median(verify_alone) / med["off"], 4),
         full=round(med["full"] / med["off"] - 1, 4),
         fast=round(med["fast"] / med["off"] - 1, 4), full_cached=round(med["full_cached"] / med["off"] - 1, 4),
         startup_seconds_off=round(med["off"], 3), startup_seconds_full=round(med["full"], 3),
         shard_megabytes=round(shard_bytes / 1e6, 2), rounds=rounds)
    return {"setup": setup}


def checkpoint_cost(setup: Any, rounds: int) -> None:
    from training.checkpoint import META
    from training.checkpoint_integrity import file_hashes

    trainer = setup.trainer
    saves, hashes = [], []
    size = 0
    for i in range(rounds):
        trainer.step = 1000 + i
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            tag = trainer.save()
        saves.append(time.perf_counter() - started)
        tag_dir = trainer.ckpt_dir / tag
        names = [p.name for p in tag_dir.iterdir() if p.is_file() and p.name != META]
        size = sum((tag_dir / n).stat().st_size for n in names)
        started = time.perf_counter()
        file_hashes(tag_dir, names)
        hashes.append(time.perf_counter() - started)
    save_s, hash_s = statistics.median(saves), statistics.median(hashes)
    emit("checkpoint_hash_share", share_of_save=round(hash_s / save_s, 4), hash_seconds=round(hash_s, 4),
         save_seconds=round(save_s, 4), checkpoint_megabytes=round(size / 1e6, 2),
         hash_gb_per_s=round(size / 1e9 / hash_s, 3) if hash_s else None, params=setup.n_params)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "bench" / "pretrain_shakespeare.yaml")
    parser.add_argument("--synthetic-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        root = Path(tmp)
        (root / "synthetic").mkdir()
        shard_cost(root / "synthetic", args.synthetic_mb, args.rounds)
        cfg = shakespeare_config(args.config, root, args.overrides)
        built = startup_share(cfg, args.rounds)
        checkpoint_cost(built["setup"], args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
