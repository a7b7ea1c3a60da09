"""Throughput of the prep stage on the shared web data, and what our wrapper costs over bare datatrove.

    .venv/bin/python bench/dataprep.py [--repeats 1] [--skip-steps]

Prints one JSON line per figure:
- `step`: docs/s and MB/s of each reader/normaliser/filter step, timed in isolation on the documents that reach
  it in the pipeline, and of each dedup sub-stage (from the stage run's own timings);
- `stage`: docs/s and MB/s of the whole `prep` stage (run_prep: accounting reader, exclusion writers, counts,
  stats.json, MLflow run) and of the same datatrove steps run bare (stock JsonlReader, no exclusion writers,
  no counting, no tracking) through LocalPipelineExecutor in the same process, one task, one worker;
- `ratio`: ours / bare, CPU time and wall time (target: <= 1.2). With one worker every task runs in this
  process, so CPU time measures the work itself; on a shared machine wall time also measures the neighbours.
  Both run `--repeats` times, alternating which goes first;
  the best time of each counts.

MB are UTF-8 megabytes (1e6) of document text read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Import from the repository root, never from bench/: a script here must not shadow a standard-library module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.filters import LambdaFilter  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers.jsonl import JsonlWriter  # noqa: E402

from dataprep import dedup  # noqa: E402
from dataprep.config import PrepConfig  # noqa: E402
from dataprep.filters import FILTER_ORDER, OfflineLanguageFilter, filter_steps, pii_step  # noqa: E402
from dataprep.normalize import normalize_steps  # noqa: E402
from dataprep.readers import InputReader, TaskFileReader  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.core.runner import run_stage  # noqa: E402

WEB = Path(__file__).resolve().parents[2] / "shared" / "data" / "web"
JSON_INPUTS = ["cleaneval_dev.jsonl", "cleanportaleval.jsonl", "l3s_gn1_googlenews.jsonl", "c4/*.json.gz",
               "ccnet/*.jsonl"]


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def input_files() -> list[str]:
    files: list[str] = []
    for pattern in JSON_INPUTS:
        files += sorted(str(p) for p in WEB.glob(pattern))
    return files


def removed_bytes(folder: Path) -> int:
    import zstandard

    total = 0
    for path in folder.glob("*.jsonl.zst"):
        data = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().decode()
        total += sum(len(json.loads(line)["text"].encode()) for line in data.splitlines())
    return total


def text_bytes(docs) -> int:
    return sum(len(d.text.encode("utf-8", "replace")) for d in docs)


def per_step(files: list[str], prep: PrepConfig, scratch: Path) -> list:
    """Time reader, normalisers and filters one at a time on the documents that reach each of them."""
    reader = InputReader(files)
    started = time.perf_counter()
    docs = list(reader.run(None, 0, 1))
    seconds = time.perf_counter() - started
    emit(kind="step", step="read", docs=len(docs), docs_per_s=round(len(docs) / seconds, 1),
         mb_per_s=round(text_bytes(docs) / 1e6 / seconds, 2))
    steps = [(s.name if s.name.isascii() else type(s).__name__, s) for s in normalize_steps(prep.normalize)]
    steps += filter_steps(prep.filters, scratch / "removed")
    pii = pii_step(prep.filters.pii)
    steps += [("pii", pii)] if pii else []
    for name, step in steps:
        if hasattr(step, "exclusion_writer"):
            step.exclusion_writer = None  # the writer's cost is measured with the whole stage
        n, size = len(docs), text_bytes(docs)
        started = time.perf_counter()
        docs = list(step.run(iter(docs), 0, 1))
        seconds = time.perf_counter() - started
        emit(kind="step", step=name, docs=n, kept=len(docs), docs_per_s=round(n / seconds, 1),
             mb_per_s=round(size / 1e6 / seconds, 2))
    return docs


def bare_pipeline(files: list[str], prep: PrepConfig, root: Path) -> list[tuple[str, list, int]]:
    """The same datatrove steps, stock and without our accounting: (name, pipeline, tasks) per sub-stage."""
    work = root / "work"
    root.mkdir(parents=True, exist_ok=True)
    (root / "paths.txt").write_text("".join(str(Path(f).relative_to(WEB)) + "\n" for f in files))
    reader = JsonlReader(str(WEB), paths_file=str(root / "paths.txt"))  # stock reader, same files
    head = [reader, *normalize_steps(prep.normalize)]
    for key, step in filter_steps(prep.filters, root / "unused"):
        step.exclusion_writer = None
        if key == "length":
            lo, hi = step.min_chars, step.max_chars
            step = LambdaFilter(lambda doc, lo=lo, hi=hi: lo <= len(doc.text) <= hi)
        elif key == "language":
            assert isinstance(step, OfflineLanguageFilter)  # datatrove's filter on the bundled model
        head.append(step)

    def writer(folder: Path) -> JsonlWriter:
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl.zst", compression="zstd")

    mh = prep.dedup.minhash
    exact_filter = dedup.exact_filter(work, root / "unused")
    exact_filter.exclusion_writer = None
    minhash_filter = dedup.minhash_filter(work, root / "unused")
    minhash_filter.exclusion_writer = None
    tail = [pii_step(prep.filters.pii)] if prep.filters.pii else []
    return [
        ("filter", head + [writer(work / "filtered"), dedup.exact_signature(work)], 1),
        ("exact_find", [dedup.exact_find(work)], 1),
        ("exact_filter", [TaskFileReader(str(work / "filtered")), exact_filter, writer(work / "pre_minhash"),
                          dedup.minhash_signature(work, mh)], 1),
        ("minhash_buckets", [dedup.minhash_buckets(work, mh)], mh.buckets),
        ("minhash_cluster", [dedup.minhash_cluster(work, mh)], 1),
        ("minhash_filter", [TaskFileReader(str(work / "pre_minhash")), minhash_filter, *tail,
                            writer(root / "output")], 1),
    ]


def run_bare(files: list[str], prep: PrepConfig, root: Path) -> tuple[float, float, dict[str, float]]:
    """Wall and CPU seconds (one worker: every task runs in this process, so CPU time covers the work)."""
    cpu = time.process_time()
    started = time.perf_counter()
    seconds = {}
    for name, pipeline, tasks in bare_pipeline(files, prep, root):
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(root / "logs" / name)).run()
        seconds[name] = time.perf_counter() - t
    return time.perf_counter() - started, time.process_time() - cpu, seconds


def run_ours(files: list[str], root: Path) -> tuple[float, float, dict]:
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump({"workdir": str(root), "data": {"inputs": files},
                                        "prep": {"tasks": 1, "workers": 1}, "tracking": {"experiment": "bench"}}))
    cfg = load_config(cfg_path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # set by mlflow in the previous repeat: use this workdir's store
    cpu = time.process_time()
    started = time.perf_counter()
    run_stage(cfg, "prep", force=True)
    seconds = time.perf_counter() - started
    return seconds, time.process_time() - cpu, json.loads((root / "prep" / "stats.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-steps", action="store_true", help="only the whole-stage comparison")
    args = parser.parse_args()
    files = input_files()
    prep = PrepConfig()  # the web defaults: every filter on, exact + MinHash dedup
    scratch = Path(tempfile.mkdtemp(prefix="bench-dataprep-"))
    try:
        if not args.skip_steps:
            per_step(files, prep, scratch)
        ours, bare, ours_cpu, bare_cpu, stats = [], [], [], [], {}
        for i in range(args.repeats):
            # alternate which goes first, so neither always pays the one-time loads (spacy, fastText) or
            # always meets the same neighbour load on a shared machine
            order = ("bare", "ours") if i % 2 == 0 else ("ours", "bare")
            for which in order:
                if which == "bare":
                    b, c, bare_stages = run_bare(files, prep, scratch / f"bare{i}")
                    bare.append(b)
                    bare_cpu.append(c)
                else:
                    o, c, stats = run_ours(files, scratch / f"ours{i}")
                    ours.append(o)
                    ours_cpu.append(c)
        docs, mb = stats["docs_in"], stats["bytes_in"] / 1e6
        last = scratch / f"ours{args.repeats - 1}" / "prep"
        removed = {k: removed_bytes(last / "removed" / k) for k in ("exact_dedup", "minhash_dedup")}
        entering = {  # documents and bytes that reach each dedup sub-stage
            "exact": (stats["docs_out"] + stats["dropped_exact_dedup"] + stats["dropped_minhash_dedup"],
                      stats["bytes_out"] + removed["exact_dedup"] + removed["minhash_dedup"]),
            "minhash": (stats["docs_out"] + stats["dropped_minhash_dedup"],
                        stats["bytes_out"] + removed["minhash_dedup"]),
        }
        for name, seconds in stats["seconds_by_substage"].items():
            if name.startswith(("exact", "minhash")):
                n, size = entering[name.split("_")[0]]
                emit(kind="step", step=name, docs=n, seconds=seconds, docs_per_s=round(n / seconds, 1),
                     mb_per_s=round(size / 1e6 / seconds, 2))
        emit(kind="stage", what="ours: scratchgpt prep (run_prep)", docs=docs, mb=round(mb, 2),
             seconds=round(min(ours), 2), docs_per_s=round(docs / min(ours), 1), mb_per_s=round(mb / min(ours), 3),
             docs_out=stats["docs_out"], runs=[round(x, 2) for x in ours],
             cpu_seconds=round(min(ours_cpu), 2), cpu_runs=[round(x, 2) for x in ours_cpu])
        emit(kind="stage", what="bare datatrove, same steps", docs=docs, mb=round(mb, 2),
             seconds=round(min(bare), 2), docs_per_s=round(docs / min(bare), 1), mb_per_s=round(mb / min(bare), 3),
             runs=[round(x, 2) for x in bare], cpu_seconds=round(min(bare_cpu), 2),
             cpu_runs=[round(x, 2) for x in bare_cpu],
             seconds_by_substage={k: round(v, 2) for k, v in bare_stages.items()})
        emit(kind="ratio", what="ours / bare CPU time", value=round(min(ours_cpu) / min(bare_cpu), 3),
             target="<= 1.2")
        emit(kind="ratio", what="ours / bare wall time", value=round(min(ours) / min(bare), 3), target="<= 1.2",
             filters=list(FILTER_ORDER), ours_seconds_by_substage=stats["seconds_by_substage"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
