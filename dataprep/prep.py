"""The prep pipeline as a list of datatrove sub-stages, and the counts it leaves behind.

    filter          read -> [html->text] -> normalise -> filters -> (exact or minhash signatures)
    exact_find      one task: which copies to drop
    exact_filter    drop exact copies -> (minhash signatures)
    minhash_buckets one task per bucket: candidate pairs
    minhash_cluster one task: clusters, which documents to drop
    minhash_filter  drop near-duplicates
    ... and the last sub-stage replaces PII and writes prep/output/<rank>.jsonl.zst

Each sub-stage has its own datatrove logging folder (prep/logs/<name>/) whose
per-task completion files let an interrupted run resume, and whose per-task
stats files hold the counts: nothing is counted in memory, so a resumed run
reports the same figures as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.jsonl import JsonlWriter

from dataprep import dedup
from dataprep.config import DataConfig, PrepConfig
from dataprep.filters import FILTER_ORDER, filter_steps, pii_step
from dataprep.html import HtmlExtractor
from dataprep.normalize import normalize_steps
from dataprep.readers import InputReader, TaskFileReader, input_format
from dataprep.removed import RemovedWriter


class Tally(PipelineStep):
    """Counts the documents and UTF-8 bytes that pass (datatrove saves the counts with the task's stats)."""

    type = "📊 - STATS"
    name = "tally"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("docs")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8", "replace")), unit="doc")
            yield doc


@dataclass
class SubStage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int
    workers: int
    # step index -> what it counts: "reader", "out", or a drop step name (counted as dropped_<name>)
    counters: dict[int, str] = field(default_factory=dict)


@dataclass
class PrepLayout:
    """Folders under <workdir>/prep."""

    root: Path
    # data.sources: every source writes into the one prep/output, its files named <source>@<rank>.jsonl.zst
    output_dir: Path | None = None
    output_prefix: str = ""

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.output_dir or self.root / "output"

    @property
    def removed(self) -> Path:
        return self.root / "removed"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"


@dataclass
class PrepPlan:
    layout: PrepLayout
    stages: list[SubStage]
    drop_steps: list[str]  # every step that can drop documents, in order


def _writer(folder: Path, prefix: str = "") -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename=prefix + "${rank}.jsonl.zst", compression="zstd")


def build_plan(files: list[str], data: DataConfig, prep: PrepConfig, root: Path, output_dir: Path | None = None,
               output_prefix: str = "") -> PrepPlan:
    """The sub-stages for these input files (already expanded; unknown formats raise ValueError)."""
    layout = PrepLayout(Path(root), output_dir, output_prefix)
    work, removed = layout.work, layout.removed
    tasks, workers = prep.tasks, min(prep.workers, prep.tasks)
    drop_steps: list[str] = ["malformed"]

    head = SubStage("filter", [], tasks, workers)
    reader = InputReader(files, text_key=data.text_key, id_key=data.id_key, strict=data.strict,
                         removed_writer=RemovedWriter(removed, "malformed"), file_progress=True,
                         txt_split=data.txt.split, txt_max_chars=data.txt.max_chars)
    head.pipeline.append(reader)
    head.counters[0] = "reader"
    if any(input_format(f) == "warc" for f in files):
        head.counters[len(head.pipeline)] = "html_extraction"
        head.pipeline.append(HtmlExtractor(exclusion_writer=RemovedWriter(removed, "html_extraction")))
        drop_steps.append("html_extraction")
    head.pipeline.extend(normalize_steps(prep.normalize, prep.language))
    for key, step in filter_steps(prep.filters, removed, prep.language):
        head.counters[len(head.pipeline)] = key
        head.pipeline.append(step)
        drop_steps.append(key)

    stages = [head]
    current = head
    minhash_cfg = prep.dedup.minhash
    if prep.dedup.exact:
        current.pipeline += [_writer(work / "filtered"), dedup.exact_signature(work)]
        stages.append(SubStage("exact_find", [dedup.exact_find(work)], 1, 1))
        current = SubStage("exact_filter", [TaskFileReader(str(work / "filtered")), dedup.exact_filter(work, removed)],
                           tasks, workers, {1: "exact_dedup"})
        stages.append(current)
        drop_steps.append("exact_dedup")
    if minhash_cfg is not False:
        current.pipeline += [_writer(work / "pre_minhash"), dedup.minhash_signature(work, minhash_cfg, prep.language)]
        stages.append(SubStage("minhash_buckets", [dedup.minhash_buckets(work, minhash_cfg)],
                               minhash_cfg.buckets, min(workers, minhash_cfg.buckets)))
        stages.append(SubStage("minhash_cluster", [dedup.minhash_cluster(work, minhash_cfg)], 1, 1))
        current = SubStage("minhash_filter", [TaskFileReader(str(work / "pre_minhash")),
                                              dedup.minhash_filter(work, removed)],
                           tasks, workers, {1: "minhash_dedup"})
        stages.append(current)
        drop_steps.append("minhash_dedup")

    # PII last: replacing addresses before dedup would make pages that differ only there look identical.
    pii = pii_step(prep.filters.pii)
    if pii is not None:
        current.pipeline.append(pii)
    current.counters[len(current.pipeline)] = "out"
    current.pipeline += [Tally(), _writer(layout.output, layout.output_prefix)]
    return PrepPlan(layout, stages, drop_steps)


def _total(value: Any) -> int:
    if isinstance(value, dict):
        return int(value.get("total", 0))
    return int(value or 0)


def collect_counts(plan: PrepPlan) -> dict[str, int]:
    """docs_in, docs_out, bytes_in, bytes_out and dropped_<step> from the sub-stages' per-task stats files."""
    counts = {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0}
    counts.update({f"dropped_{step}": 0 for step in plan.drop_steps})
    for step in plan.drop_steps:
        if step in FILTER_ORDER:  # the quality filters also count bytes (dataprep.filters.Accounted)
            counts[f"bytes_dropped_{step}"] = 0
            counts[f"bytes_edited_{step}"] = 0
    for stage in plan.stages:
        for stats_file in sorted((plan.layout.logs / stage.name / "stats").glob("*.json")):
            steps = json.loads(stats_file.read_text())
            for index, role in stage.counters.items():
                stats = steps[index]["stats"]
                if role == "reader":
                    counts["docs_in"] += _total(stats.get("docs_in"))
                    counts["bytes_in"] += _total(stats.get("bytes_in"))
                    counts["dropped_malformed"] += _total(stats.get("malformed"))
                elif role == "out":
                    counts["docs_out"] += _total(stats.get("docs"))
                    counts["bytes_out"] += _total(stats.get("bytes"))
                else:
                    counts[f"dropped_{role}"] += _total(stats.get("dropped"))
                    if role in FILTER_ORDER:
                        counts[f"bytes_dropped_{role}"] += _total(stats.get("bytes_dropped"))
                        counts[f"bytes_edited_{role}"] += _total(stats.get("bytes_edited"))
    return counts


def check_invariant(counts: dict[str, int]) -> None:
    """docs_in == docs_out + sum(dropped): a document that left without a record is a bug, never a figure."""
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped_"))
    if counts["docs_in"] != counts["docs_out"] + dropped:
        raise RuntimeError(
            f"prep lost documents: docs_in={counts['docs_in']} != docs_out={counts['docs_out']} + dropped={dropped}"
        )


# The config keys that turn each step down, for the warnings below.
# The keys that tune the drop steps that are not quality filters (those say it themselves: FilterSection.tuning).
OTHER_TUNING = {
    "malformed": "the input files (see prep/removed/malformed/), data.text_key",
    "html_extraction": "the WARC inputs (pages with no main text)",
    "exact_dedup": "prep.dedup.exact (the input holds many identical documents)",
    "minhash_dedup": "prep.dedup.minhash.buckets / hashes_per_bucket (or prep.dedup.minhash=false)",
}


def tuning_keys(step: str) -> str:
    """The config keys that tune a drop step, as a warning names them."""
    from dataprep.config import filter_sections

    section = filter_sections().get(step)
    if section is None:
        return OTHER_TUNING.get(step, step)
    keys = [k if "." in k else f"prep.filters.{step}.{k}" for k in section.tuning]
    return f"{' / '.join(keys)} (or prep.filters.{step}=false)"


def outcome_warnings(stats: dict[str, Any], step_share: float = 0.5, stage_share: float = 0.2) -> list[str]:
    """Warning lines for prep counts (`prep/stats.json`): a step that removed more than `step_share`
    of the documents or bytes that reached it (naming the keys that tune it), and a stage that kept
    under `stage_share` of the documents or bytes. Steps are taken in the order they ran."""
    lines: list[str] = []
    docs, nbytes = stats.get("docs_in", 0), stats.get("bytes_in", 0)
    steps = [k.removeprefix("dropped_") for k in stats if k.startswith("dropped_")]
    for step in steps:
        dropped = stats[f"dropped_{step}"]
        lost = stats.get(f"bytes_dropped_{step}", 0) + stats.get(f"bytes_edited_{step}", 0)
        edited = stats.get(f"bytes_edited_{step}", 0)
        if docs and dropped > step_share * docs:
            lines.append(f"prep: {step} dropped {dropped} of the {docs} documents that reached it "
                         f"({dropped / docs:.0%}); tune it with {tuning_keys(step)}")
        elif nbytes and lost > step_share * nbytes:
            lines.append(f"prep: {step} removed {lost:,} of the {nbytes:,} bytes that reached it ({lost / nbytes:.0%}; "
                         f"{edited:,} by deleting lines of documents it kept); tune it with "
                         f"{tuning_keys(step)}")
        docs -= dropped
        nbytes -= lost
    for what, key_in, key_out in (("documents", "docs_in", "docs_out"), ("bytes", "bytes_in", "bytes_out")):
        total, kept = stats.get(key_in, 0), stats.get(key_out, 0)
        if total and kept < stage_share * total:
            lines.append(f"prep: kept {kept:,} of {total:,} {what} ({kept / total:.0%}); the lines above and "
                         f"prep/removed/<step>/ say which steps removed them and why")
    return lines
