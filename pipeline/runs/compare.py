"""`scratchgpt runs --compare`: the params, tags and final metrics that differ between runs, and a loss-curve PNG.

`compare` builds the side-by-side text from runs found with pipeline.runs.store;
`plot_curves` reads their metric histories from the store and draws the chosen
metric and the training loss against tokens seen (or steps, where tokens per step
cannot be derived). matplotlib is imported inside `plot_curves` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.runs.store import (
    PRETRAIN_MANIFEST_TAG,
    SHARD_MANIFEST_TAG,
    SHORT_ID,
    STAGE_TAG,
    TOKENIZER_TAG,
    WORKDIR_TAG,
    Store,
    stage_group,
)
from pipeline.runs.table import (
    DERIVED_PARAMS,
    KEY_PARAMS,
    duration_s,
    fmt_duration,
    fmt_time,
    fmt_value,
    render_table,
    varying_params,
)

FIGURE_SIZE_IN = (12.0, 5.0)
FIGURE_DPI = 100  # so the PNG is 1200 x 500 pixels
# The parts of tokens-per-step, as the training loop computes it.
TOKENS_PER_STEP_PARAMS = ("train.micro_batch_size", "train.grad_accum", "world_size", "model.block_size")
CURVE_METRICS = ("val_bpb", "eval_loss", "val_loss", "train_loss")  # first one any run has, when --metric is absent
PROVENANCE_TAGS = (PRETRAIN_MANIFEST_TAG, SHARD_MANIFEST_TAG, TOKENIZER_TAG, "config_hash", "git_commit", WORKDIR_TAG)


def run_label(run: Any, differing: list[str]) -> str:
    """Short id, name and up to three of the params that tell these runs apart (key params first)."""
    group = stage_group(run.data.tags.get(STAGE_TAG, ""))
    key_order = [k for k, _ in KEY_PARAMS.get(group, [])]
    telling = [k for k in differing if k not in DERIVED_PARAMS]
    ranked = [k for k in key_order if k in telling] + [k for k in telling if k not in key_order]
    bits = [f"{k.rsplit('.', 1)[-1]}={fmt_value(run.data.params.get(k), 14)}" for k in ranked[:3]]
    return " ".join([run.info.run_id[:SHORT_ID], run.info.run_name or "", *bits]).strip()


def tokens_per_step(run: Any) -> int | None:
    """Tokens one optimizer step consumes, from the params the pretrain stage logs; None if any is missing."""
    product = 1
    for key in TOKENS_PER_STEP_PARAMS:
        try:
            product *= int(run.data.params[key])
        except (KeyError, ValueError):
            return None
    return product


@dataclass
class Comparison:
    runs: list[Any]
    differing: list[str]  # param keys
    metrics: list[str]
    text: str


def compare(runs: list[Any]) -> Comparison:
    differing = varying_params(runs, set())
    metrics = sorted({k for r in runs for k in r.data.metrics})
    headers = ["", *(f"{r.info.run_id[:SHORT_ID]} {r.info.run_name or ''}".strip() for r in runs)]
    lines = ["Runs:"]
    for run in runs:
        lines.append(f"  {run.info.run_id}  {run.info.run_name or ''}  stage={run.data.tags.get(STAGE_TAG, '-')}  "
                     f"{run.info.status}  {fmt_time(run.info.start_time)} UTC  {fmt_duration(duration_s(run))}")
    if differing:
        rows = [[k, *(fmt_value(r.data.params.get(k), 40) for r in runs)] for k in differing]
        lines += ["", f"Params that differ ({len(differing)}):", render_table(["param", *headers[1:]], rows, set())]
    else:
        lines += ["", "Params: all the same"]
    provenance = [t for t in PROVENANCE_TAGS if len({r.data.tags.get(t) for r in runs}) > 1]
    if provenance:
        rows = [[t, *(fmt_value(r.data.tags.get(t), 16) for r in runs)] for t in provenance]
        lines += ["", "Tags that differ (data, code, workdir):", render_table(["tag", *headers[1:]], rows, set())]
    if metrics:
        rows = [[m, *(fmt_value(r.data.metrics.get(m)) for r in runs)] for m in metrics]
        lines += ["", "Final metrics (last logged value):",
                  render_table(["metric", *headers[1:]], rows, set(range(1, len(headers))))]
    return Comparison(runs, differing, metrics, "\n".join(lines))


def plot_curves(store: Store, comparison: Comparison, out: Path, metric: str | None = None) -> tuple[Path, list[str]]:
    """Write a PNG: `metric` (val bpb by default) and train loss against tokens seen. Returns (path, notes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = comparison.runs
    history = {r.info.run_id: {} for r in runs}
    notes: list[str] = []
    if metric is None:
        metric = next((m for m in CURVE_METRICS if any(m in r.data.metrics for r in runs)), CURVE_METRICS[0])
    panels = [metric] + (["train_loss"] if metric != "train_loss" else [])
    for run in runs:
        for name in panels:
            points = store.client.get_metric_history(run.info.run_id, name)
            history[run.info.run_id][name] = sorted((p.step, p.value) for p in points)
    per_step = {r.info.run_id: tokens_per_step(r) for r in runs}
    use_tokens = all(per_step.values())
    if not use_tokens:
        missing = [r.info.run_id[:SHORT_ID] for r in runs if not per_step[r.info.run_id]]
        notes.append(f"x axis is the optimizer step: tokens per step cannot be derived for {', '.join(missing)} "
                     f"(needs params {', '.join(TOKENS_PER_STEP_PARAMS)})")

    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(runs))]  # one colour per run in both panels
    labels = [run_label(run, comparison.differing) for run in runs]
    handles: dict[str, Any] = {}
    for ax, name in zip(axes, panels, strict=True):
        for run, color, label in zip(runs, colors, labels, strict=True):
            points = history[run.info.run_id][name]
            if not points:
                continue
            scale = per_step[run.info.run_id] if use_tokens else 1
            xs = [step * scale for step, _ in points]
            ys = [value for _, value in points]
            (line,) = ax.plot(xs, ys, color=color, marker="o" if len(points) <= 30 else None, markersize=3,
                              linewidth=1.5, label=label)
            handles.setdefault(label, line)
        without = [r.info.run_id[:SHORT_ID] for r in runs if not history[r.info.run_id][name]]
        if without:
            notes.append(f"no {name} history in {', '.join(without)}: not drawn")
        ax.set_title(f"{_metric_label(name).split(' (')[0].capitalize()} vs {'tokens seen' if use_tokens else 'step'}")
        if use_tokens:
            ax.set_xlabel("tokens seen (step x micro_batch_size x grad_accum x world_size x block_size)", fontsize=8)
            ax.xaxis.set_major_formatter(EngFormatter())
        else:
            ax.set_xlabel("optimizer step (tokens per step unknown for some runs)", fontsize=8)
        ax.set_ylabel(_metric_label(name))
        ax.grid(True, alpha=0.3)
        if len(without) == len(runs):
            ax.text(0.5, 0.5, f"no run logged {name}", ha="center", va="center", transform=ax.transAxes)
    experiments = sorted({store.experiment_names.get(r.info.experiment_id, r.info.experiment_id) for r in runs})
    fig.suptitle(f"scratchgpt: {len(runs)} runs compared (experiment {', '.join(experiments)})")
    # One legend for both panels, below them, so it never hides a curve.
    columns = 1 if len(runs) <= 3 else 2
    legend_rows = -(-len(runs) // columns)
    bottom = min(0.45, 0.14 + 0.045 * legend_rows)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=bottom, wspace=0.22)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=columns, fontsize=8,
                   frameon=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=FIGURE_DPI, format="png")  # no bbox_inches="tight": the size stays FIGURE_SIZE_IN * dpi
    return out, notes


def _metric_label(name: str) -> str:
    return {"val_bpb": "validation bits per byte", "train_loss": "training loss (nats/token)",
            "val_loss": "validation loss (nats per token)", "eval_loss": "eval loss",
            "eval_accuracy": "eval accuracy"}.get(name, name)
