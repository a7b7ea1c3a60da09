"""Forward+backward tokens/s of our GPT against transformers' GPT2LMHeadModel of the same shape, same batch.

    .venv/bin/python bench/model_throughput.py [--steps 3] [--rounds 5] [--batch 16] [--device cpu|cuda]

Prints one JSON line per figure. The reference runs in the same process on the same inputs, so the ratio
holds even when the machine is shared. On CUDA both run under bf16 autocast.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path; import from the repository root instead, so that no
# file in bench/ can shadow a standard-library module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from training.config import ModelConfig  # noqa: E402
from training.export import export_hf  # noqa: E402
from training.model import GPT, GPTConfig  # noqa: E402


def timed(step, steps: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved_tokens_per_sec(steps_by_name: dict, tokens_per_step: int, steps: int, rounds: int) -> dict:
    """Median tokens/s over rounds that alternate the contenders, so a busy neighbour slows both alike."""
    for step in steps_by_name.values():  # warm-up: allocator, kernels
        step()
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            seconds[name].append(timed(step, steps))
    return {name: steps * tokens_per_step / statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPTConfig.from_model_config(ModelConfig(), vocab_size=args.vocab)
    ours = GPT(config).to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours.state_dict(), config, None, Path(tmp))
        theirs = GPT2LMHeadModel.from_pretrained(tmp, local_files_only=True).to(args.device)
    x = torch.randint(0, args.vocab, (args.batch, config.block_size), device=args.device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else contextlib.nullcontext()
    )

    def ours_step() -> None:
        with autocast:
            _, loss = ours(x, x)
        loss.backward()

    def theirs_step() -> None:
        with autocast:
            loss = theirs(x, labels=x).loss
        loss.backward()

    threads = torch.get_num_threads()
    tps = interleaved_tokens_per_sec(
        {"ours": ours_step, "theirs": theirs_step}, args.batch * config.block_size, args.steps, args.rounds
    )
    ref, ours_tps = tps["theirs"], tps["ours"]
    common = {"device": args.device, "threads": threads, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "batch": args.batch, "config": config.to_dict()}
    print(json.dumps({"figure": "fwd_bwd_tokens_per_sec_transformers_gpt2", "value": round(ref, 1), **common}))
    print(json.dumps({"figure": "fwd_bwd_tokens_per_sec_ours", "value": round(ours_tps, 1), **common}))
    print(json.dumps({"figure": "ours_vs_transformers_ratio", "value": round(ours_tps / ref, 3), **common}))

    # Generation: the KV cache against recomputing the whole context each step, same seeded tokens.
    ours.eval()
    prompt = x[:1, :1]
    new = config.block_size - 1

    def generate(use_cache: bool) -> float:
        started = time.perf_counter()
        with autocast:
            out = ours.generate(prompt, new, generator=torch.Generator(args.device).manual_seed(0), use_cache=use_cache)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        results.append(out)
        return new / seconds

    results: list[torch.Tensor] = []
    generate(True)  # warm-up
    cached = statistics.median(generate(True) for _ in range(3))
    plain = statistics.median(generate(False) for _ in range(3))
    same = all(torch.equal(results[0], r) for r in results)
    common = {"device": args.device, "threads": threads, "load_avg_1m": os.getloadavg()[0], "new_tokens": new,
              "same_tokens": same}
    print(json.dumps({"figure": "generate_tokens_per_sec_kv_cache", "value": round(cached, 1), **common}))
    print(json.dumps({"figure": "generate_tokens_per_sec_no_cache", "value": round(plain, 1), **common}))
    print(json.dumps({"figure": "kv_cache_speedup", "value": round(cached / plain, 2), **common}))


if __name__ == "__main__":
    main()
