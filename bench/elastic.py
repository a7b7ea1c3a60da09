"""The cost of elastic resume: converting a 2-process ZeRO-3 checkpoint to DeepSpeed's universal format.

    .venv/bin/python bench/elastic.py [--layers 8] [--width 512] [--repeat 2]

Builds a small workdir from Tiny Shakespeare (prep, tokenizer, shard through the real stages, not timed),
trains one step of a GPT of the given shape on 2 processes under torchrun (ZeRO-3, fp32, gloo) so that a real
2-partition checkpoint exists, then times `training.elastic.convert` on it (what a resume on another world
size does once, on rank 0). Prints one JSON line: checkpoint bytes, conversion seconds (best of --repeat, each
from scratch), seconds per GB (1e9 bytes), and the size of the universal folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()

    import yaml

    from pipeline.config import load_config
    from pipeline.core.runner import run_stage
    from training import checkpoint, elastic

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    root.mkdir(parents=True, exist_ok=True)
    text, val = root / "train.txt", root / "val.txt"
    data = SHAKESPEARE.read_bytes()
    text.write_bytes(data[:300_000])
    val.write_bytes(data[-50_000:])
    heads = max(1, args.width // 64)
    tree = {
        "workdir": str(root / "w"), "data": {"inputs": [str(text)], "val_inputs": [str(val)]},
        "prep": {"tasks": 1, "workers": 1, "dedup": {"exact": False, "minhash": False},
                 "filters": {k: False for k in ("length", "gopher_quality", "gopher_repetition", "c4_quality",
                                                "fineweb_quality", "language", "pii")}},
        "tokenizer": {"vocab_size": 1024}, "shards": {"tasks": 1, "workers": 1},
        "model": {"n_layer": args.layers, "n_head": heads, "n_embd": args.width, "block_size": 64},
        "train": {"micro_batch_size": 1, "global_batch_size": 2, "max_steps": 1, "precision": "fp32",
                  "zero_stage": 3, "eval_batches": 1, "sample_tokens": 0, "warmup_steps": 0},
        "tracking": {"experiment": "bench-elastic"},
    }
    config = root / "bench.yaml"
    config.write_text(yaml.safe_dump(tree))
    cfg = load_config(config)
    for name in ("prep", "tokenizer", "shard"):
        run_stage(cfg, name)
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                    "-m", "pipeline.cli", "pretrain", str(config)], check=True, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - started
    ckpt = Path(cfg.workdir) / "pretrain" / "checkpoints"
    tag_dir = ckpt / checkpoint.latest_tag(ckpt)
    meta = checkpoint.read_meta(ckpt, tag_dir.name)
    source = sum(meta["files"].values())
    best = float("inf")
    for _ in range(args.repeat):
        shutil.rmtree(elastic.universal_dir(tag_dir), ignore_errors=True)
        t0 = time.perf_counter()
        assert elastic.convert(tag_dir)
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"figure": "universal_conversion", "n_layer": args.layers, "n_embd": args.width,
                      "params": meta.get("n_params"), "written_by": meta["world_size"],
                      "checkpoint_bytes": source, "universal_bytes": folder_bytes(elastic.universal_dir(tag_dir)),
                      "seconds": round(best, 3), "seconds_per_gb": round(best / (source / 1e9), 2),
                      "train_and_save_seconds": round(train_s, 1)}), flush=True)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
