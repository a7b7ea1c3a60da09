"""The `scratchgpt runs` table and CSV: runs grouped by stage with key params, final metrics and duration.

Also the small formatters (times, durations, values) that the comparison and the
lineage views share, and the per-stage choice of which params and metrics get a
column. Works on runs already fetched from the store (pipeline.runs.store); nothing
here talks to MLflow.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

from pipeline.runs.store import (
    PARENT_TAG,
    PRETRAIN_MANIFEST_TAG,
    SHARD_MANIFEST_TAG,
    SHORT_ID,
    STAGE_TAG,
    TOKENIZER_TAG,
    WORKDIR_TAG,
    stage_group,
)

# Per stage: the params worth a column (key, header) and the metrics shown. Finetune tasks are "finetune/<task>".
KEY_PARAMS: dict[str, list[tuple[str, str]]] = {
    "prep": [("data.inputs", "inputs"), ("prep.dedup.exact", "exact_dedup")],
    "tokenizer": [("tokenizer.vocab_size", "vocab_asked")],
    "shard": [("shards.val_fraction", "val_fraction")],
    "pretrain": [("model.n_layer", "n_layer"), ("model.n_head", "n_head"), ("model.n_embd", "n_embd"),
                 ("model.block_size", "block"), ("train.lr", "lr"), ("train.micro_batch_size", "mbs"),
                 ("train.grad_accum", "accum"), ("world_size", "world"), ("train.max_steps", "max_steps")],
    "finetune": [("finetune.from_scratch", "from_scratch"), ("finetune.vs_scratch", "vs_scratch"),
                 ("finetune.seeds", "seeds"), ("finetune.init_from", "init_from")],
    "finetune/": [("task.kind", "kind"), ("task.lr", "lr"), ("task.head_lr", "head_lr"),
                  ("task.pooling", "pooling"), ("task.max_steps", "max_steps"), ("task.from_scratch", "from_scratch"),
                  ("task.seed", "seed")],
}
KEY_METRICS: dict[str, list[str]] = {
    "prep": ["docs_in", "docs_out", "bytes_out"],
    "tokenizer": ["vocab_size", "bytes_per_token"],
    "shard": ["train_tokens", "val_tokens", "train_docs", "val_docs"],
    "pretrain": ["train_loss", "val_loss", "val_bpb", "tokens_per_sec", "mfu"],
    "finetune/": ["eval_accuracy", "eval_macro_f1", "eval_loss", "train_loss"],
}
MAX_VARYING_COLUMNS = 4
# Params that follow from others or name a place: not shown as "what differs" in table columns and legends.
DERIVED_PARAMS = {"memory_estimate_bytes", "n_params", "workdir", "tracking.uri", "tracking.experiment"}


def duration_s(run: Any) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    if not start:
        return None
    if not end:  # still running (or crashed without ending): time so far
        end = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    return max(0.0, (end - start) / 1000)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def fmt_value(value: Any, width: int = 24) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def manifest_hash(run: Any) -> str:
    tags = run.data.tags
    return tags.get(PRETRAIN_MANIFEST_TAG) or tags.get(SHARD_MANIFEST_TAG) or ""


def varying_params(runs: list[Any], skip: set[str]) -> list[str]:
    """Params (other than `skip`) whose value is not the same in every run, sorted."""
    keys = sorted({k for r in runs for k in r.data.params} - skip)
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def render_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]).rstrip()


def stage_table(group: str, runs: list[Any]) -> str:
    """One stage's runs: identity, key params, params that vary between these runs, final metrics."""
    key_params = KEY_PARAMS.get(group, [])
    shown = {k for k, _ in key_params}
    varying = varying_params(runs, shown | DERIVED_PARAMS)
    extra = varying[:MAX_VARYING_COLUMNS]
    metric_names = KEY_METRICS.get(group) or sorted({k for r in runs for k in r.data.metrics})[:6]
    metric_names = [m for m in metric_names if any(m in r.data.metrics for r in runs)]
    # The stage column only where it says more than the group title (a fine-tuning task, a run with no stage).
    with_stage = any(run.data.tags.get(STAGE_TAG, "-") != group for run in runs)
    headers = ["run", "name", *(["stage"] if with_stage else []), "status", "started (UTC)", "duration", "manifest",
               *(h for _, h in key_params), *extra, *metric_names]
    rows = []
    for run in runs:
        params = run.data.params
        rows.append([run.info.run_id[:SHORT_ID], run.info.run_name or "",
                     *([run.data.tags.get(STAGE_TAG, "-")] if with_stage else []),
                     run.info.status, fmt_time(run.info.start_time), fmt_duration(duration_s(run)),
                     manifest_hash(run)[:SHORT_ID] or "-",
                     *(fmt_value(params.get(k)) for k, _ in key_params),
                     *(fmt_value(params.get(k)) for k in extra),
                     *(fmt_value(run.data.metrics.get(m)) for m in metric_names)])
    duration_col = headers.index("duration")
    right = {duration_col} | set(range(duration_col + 2, len(headers)))
    text = render_table(headers, rows, right)
    if len(varying) > len(extra):
        text += (f"\n(+{len(varying) - len(extra)} more params differ between these runs: "
                 f"{', '.join(varying[len(extra):len(extra) + 6])}{'…' if len(varying) > len(extra) + 6 else ''}; "
                 "see --compare or --csv)")
    return text


def format_runs(runs: list[Any], more: bool, limit: int) -> str:
    """Runs grouped by stage (each stage has its own columns), in the search order within each group."""
    if not runs:
        return "no runs match"
    groups: dict[str, list[Any]] = {}
    for run in runs:
        groups.setdefault(stage_group(run.data.tags.get(STAGE_TAG, "-")), []).append(run)
    parts = []
    for group, members in groups.items():
        title = "finetune tasks" if group == "finetune/" else group
        parts.append(f"== {title} ({len(members)} run{'s' if len(members) != 1 else ''}) ==\n"
                     + stage_table(group, members))
    if more:
        parts.append(f"(showing the first {limit}; more runs match: raise --limit)")
    return "\n\n".join(parts)


def runs_csv(runs: list[Any], experiment_names: dict[str, str]) -> str:
    """Every run as one CSV row: identity, full hashes, every param and every final metric."""
    params = sorted({k for r in runs for k in r.data.params})
    metrics = sorted({k for r in runs for k in r.data.metrics})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run_id", "experiment", "name", "stage", "status", "start_time", "duration_s",
                     "manifest_sha256", "tokenizer_sha256", "git_commit", "workdir", "parent_run_id",
                     *(f"params.{k}" for k in params), *(f"metrics.{k}" for k in metrics)])
    for run in runs:
        tags = run.data.tags
        start = (dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.timezone.utc).isoformat()
                 if run.info.start_time else "")
        seconds = duration_s(run)
        writer.writerow([run.info.run_id, experiment_names.get(run.info.experiment_id, run.info.experiment_id),
                         run.info.run_name or "", tags.get(STAGE_TAG, ""), run.info.status, start,
                         "" if seconds is None else f"{seconds:.3f}", manifest_hash(run), tags.get(TOKENIZER_TAG, ""),
                         tags.get("git_commit", ""), tags.get(WORKDIR_TAG, ""), tags.get(PARENT_TAG, ""),
                         *(run.data.params.get(k, "") for k in params),
                         *(repr(run.data.metrics[k]) if k in run.data.metrics else "" for k in metrics)])
    return out.getvalue()
