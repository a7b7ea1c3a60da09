"""Tokenization throughput of the shard stage against raw `Tokenizer.encode_batch`, and loader throughput.

    .venv/bin/python bench/tokenize.py [--repeat 1] [--rounds 2] [--tasks 2] [--pretrain-tokens-per-sec N]

The corpus is the shared data's natural text (web pages, C4, CCNet, Tiny Shakespeare
in chunks, SST-2 sentences), `--repeat` times with fresh ids. One byte-level BPE
(vocab 8192) is trained on it, then in alternating rounds:

- raw: `Tokenizer.encode_batch` (and `encode_batch_fast`) over all documents in this process;
- stage: the shard stage's datatrove pipeline (JsonlReader -> TokenShardWriter, `--tasks`
  tasks) on the same documents as .jsonl.zst, end to end: process start, reading,
  tokenizing, Arrow writing, checksums. Also its steady-state rate: the time the
  TokenShardWriter step itself reports.

Then the PackedLoader's tokens/s over the shards (block 256, micro-batch 16) against
what pretraining consumes: a plain torch forward+backward of the default model
config (training.config.ModelConfig, micro-batch 16) on this machine, unless
`--pretrain-tokens-per-sec` gives it. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file's name shadows the standard library's `tokenize` (which huggingface_hub imports):
# take bench/ off the path that Python put first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def emit(**fields: object) -> None:
    print(json.dumps({"bench": "tokenize", **fields}), flush=True)


def corpus(repeat: int) -> list[dict[str, str]]:
    import gzip

    docs: list[dict[str, str]] = []

    def add(prefix: str, texts: list[str]) -> None:
        docs.extend({"id": f"{prefix}/{i}", "text": t} for i, t in enumerate(texts) if t)

    for path in sorted((SHARED / "web").glob("*.jsonl")) + sorted((SHARED / "web" / "ccnet").glob("*.jsonl")):
        add(path.name, [json.loads(line).get("text", "") for line in path.open(encoding="utf-8")])
    for path in sorted((SHARED / "web" / "c4").glob("*.json.gz")):
        add(path.name, [json.loads(line).get("text", "") for line in gzip.open(path, "rt", encoding="utf-8")])
    play = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    add("shakespeare", [play[i : i + 10_000] for i in range(0, len(play), 10_000)])
    sst = (SHARED / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    add("sst2", ["\n".join(line.split("\t", 1)[-1] for line in sst[i : i + 200]) for i in range(0, len(sst), 200)])
    return [{"id": f"r{r}/{d['id']}", "text": d["text"]} for r in range(repeat) for d in docs]


def write_jsonl_zst(folder: Path, docs: list[dict[str, str]], files: int) -> None:
    import zstandard

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        lines = "".join(json.dumps({"text": d["text"], "id": d["id"], "metadata": {}}) + "\n" for d in docs[k::files])
        (folder / f"{k:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines.encode()))


def run_stage(clean: Path, tok_dir: Path, out: Path, logs: Path, tasks: int, workers: int) -> tuple[float, float]:
    """Wall seconds of the shard stage's pipeline, and the slowest task's seconds inside TokenShardWriter."""
    from datatrove.pipeline.readers import JsonlReader

    from dataprep.shard_step import TokenShardWriter
    from dataprep.tokenizer import tokenizer_sha256
    from pipeline.core.executors import run_local
    from pipeline.stages.shard import SubStage, merge_parts
    from pipeline.stages.tokenizer import PREP_GLOB

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    pipeline = [JsonlReader(str(clean), glob_pattern=PREP_GLOB, recursive=False),
                TokenShardWriter(tok_dir, out, val_fraction=0.01)]
    started = time.perf_counter()
    run_local([SubStage("docs", pipeline, tasks, workers)], logs, label="bench")
    merge_parts(out, tokenizer_sha256(tok_dir))  # manifest.json, as the stage ends
    wall = time.perf_counter() - started
    step_seconds = []
    for path in (logs / "docs" / "stats").glob("*.json"):
        for step in json.loads(path.read_text()):
            if "token shards" in step["name"]:
                step_seconds.append(step["time_stats"]["total"])
    return wall, max(step_seconds)


def pretrain_tokens_per_sec(vocab: int, steps: int) -> tuple[float, dict]:
    """Tokens/s of a plain forward+backward of the default model config at micro-batch 16 (no optimizer step)."""
    import torch

    from training.config import ModelConfig, TrainConfig
    from training.model import GPT, GPTConfig

    mc, batch = ModelConfig(), TrainConfig().micro_batch_size
    model = GPT(GPTConfig.from_model_config(mc, vocab))
    x = torch.randint(0, vocab, (batch, mc.block_size))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        _, loss = model(x, x)
        loss.backward()

    step()
    step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    shape = {"n_layer": mc.n_layer, "n_embd": mc.n_embd, "block_size": mc.block_size, "micro_batch": batch,
             "vocab": vocab, "torch_threads": torch.get_num_threads()}
    return batch * mc.block_size / statistics.median(times), shape


def loader_tokens_per_sec(shards: Path, seconds: float) -> float:
    from training.data import PackedLoader

    loader = PackedLoader(shards, "train", 256, 16, seed=1)
    n = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(100):
            loader.next_batch()
        n += 100
    return n * 16 * 256 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="copies of the corpus (fresh ids each)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating raw/stage rounds (median reported)")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--loader-seconds", type=float, default=5.0)
    parser.add_argument("--pretrain-steps", type=int, default=5)
    parser.add_argument("--pretrain-tokens-per-sec", type=float, default=None,
                        help="what pretraining consumes, instead of measuring the default model here")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    from dataprep.tokenizer import save_tokenizer, text_encoder, train_tokenizer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    docs = corpus(args.repeat)
    texts = [d["text"] for d in docs]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 2**20
    emit(figure="corpus", docs=len(docs), mb=round(mb, 2), cpus=os.cpu_count(), load_avg_1m=os.getloadavg()[0])

    started = time.perf_counter()
    tok = train_tokenizer(texts, args.vocab)
    tok_dir = work / "tokenizer"
    save_tokenizer(tok, tok_dir)
    emit(figure="tokenizer_train", seconds=round(time.perf_counter() - started, 2), vocab=tok.get_vocab_size())
    tok = text_encoder(tok)  # as the stage encodes: special-token strings in text stay text
    clean = work / "prep" / "output"
    write_jsonl_zst(clean, docs, files=max(4, args.tasks * 2))

    raw, raw_fast, wall, steady = [], [], [], []
    tokens = 0
    for _ in range(args.rounds):
        started = time.perf_counter()
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
        raw.append(time.perf_counter() - started)
        started = time.perf_counter()
        tok.encode_batch_fast(texts)
        raw_fast.append(time.perf_counter() - started)
        w, s = run_stage(clean, tok_dir, work / "shards", work / "logs", args.tasks, args.workers)
        wall.append(w)
        steady.append(s)

    def rate(seconds: list[float]) -> dict:
        t = statistics.median(seconds)
        return {"mb_per_s": round(mb / t, 3), "tokens_per_s": round(tokens / t), "seconds": round(t, 2)}

    emit(figure="raw_encode_batch", **rate(raw))
    emit(figure="raw_encode_batch_fast", **rate(raw_fast))
    emit(figure="shard_stage_wall", tasks=args.tasks, workers=args.workers, **rate(wall),
         ratio_vs_encode_batch=round(statistics.median(raw) / statistics.median(wall), 3),
         ratio_vs_encode_batch_fast=round(statistics.median(raw_fast) / statistics.median(wall), 3), target=0.7)
    emit(figure="shard_stage_steady", note="time inside TokenShardWriter (slowest task), without process start",
         **rate(steady), ratio_vs_encode_batch=round(statistics.median(raw) / statistics.median(steady), 3),
         ratio_vs_encode_batch_fast=round(statistics.median(raw_fast) / statistics.median(steady), 3))

    loader_rate = loader_tokens_per_sec(work / "shards", args.loader_seconds)
    emit(figure="loader", tokens_per_s=round(loader_rate), block_size=256, micro_batch=16)
    if args.pretrain_tokens_per_sec:
        consumed, source = args.pretrain_tokens_per_sec, {"source": "--pretrain-tokens-per-sec"}
    else:
        consumed, shape = pretrain_tokens_per_sec(tok.get_vocab_size(), args.pretrain_steps)
        source = {"source": "measured: torch forward+backward, default ModelConfig", **shape}
    emit(figure="pretrain_consumption", tokens_per_s=round(consumed), **source)
    emit(figure="loader_vs_pretrain", ratio=round(loader_rate / consumed, 1), target=50,
         load_avg_1m=os.getloadavg()[0])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
