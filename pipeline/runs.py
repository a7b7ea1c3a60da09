"""The runs in an MLflow store: a table, a side-by-side comparison with a loss-curve PNG, and lineage.

Reads what the stages record (pipeline.tracking.stage_run and each stage's tags)
and, for lineage, the files in the run's workdir. Only an `MlflowClient` is
used, never `mlflow.set_tracking_uri`, which would leak the URI into the
process environment. mlflow and matplotlib are imported inside functions.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_config

# Tag names the stages write (pipeline.tracking.stage_run, stage_shard, stage_tokenizer, stage_pretrain).
STAGE_TAG = "stage"
WORKDIR_TAG = "workdir"
PARENT_TAG = "mlflow.parentRunId"
PRETRAIN_MANIFEST_TAG = "shard_manifest_sha256"  # on pretrain runs: the shards it trained on
SHARD_MANIFEST_TAG = "manifest_sha256"  # on shard runs: the manifest they wrote
TOKENIZER_TAG = "tokenizer_sha256"

SHORT_ID = 8
FIGURE_SIZE_IN = (12.0, 5.0)
FIGURE_DPI = 100  # so the PNG is 1200 x 500 pixels

# Per stage: the params worth a column (key, header) and the metrics shown. Finetune tasks are "finetune/<task>".
KEY_PARAMS: dict[str, list[tuple[str, str]]] = {
    "prep": [("data.inputs", "inputs"), ("prep.dedup.exact", "exact_dedup")],
    "tokenizer": [("tokenizer.vocab_size", "vocab_asked")],
    "shard": [("shards.val_fraction", "val_fraction")],
    "pretrain": [("model.n_layer", "n_layer"), ("model.n_head", "n_head"), ("model.n_embd", "n_embd"),
                 ("model.block_size", "block"), ("train.lr", "lr"), ("train.micro_batch_size", "mbs"),
                 ("train.grad_accum", "accum"), ("world_size", "world"), ("train.max_steps", "max_steps")],
    "finetune": [("finetune.from_scratch", "from_scratch"), ("finetune.init_from", "init_from")],
    "finetune/": [("task.kind", "kind"), ("task.lr", "lr"), ("task.max_steps", "max_steps"),
                  ("task.from_scratch", "from_scratch")],
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
# The parts of tokens-per-step, as the training loop computes it.
TOKENS_PER_STEP_PARAMS = ("train.micro_batch_size", "train.grad_accum", "world_size", "model.block_size")
CURVE_METRICS = ("val_bpb", "eval_loss", "val_loss", "train_loss")  # first one any run has, when --metric is absent
PROVENANCE_TAGS = (PRETRAIN_MANIFEST_TAG, SHARD_MANIFEST_TAG, TOKENIZER_TAG, "config_hash", "git_commit", WORKDIR_TAG)


class RunsError(ConfigError):
    """A store, experiment or run that cannot be used; printed as `scratchgpt: <message>`, exit 2."""


# ------------------------------------------------------------------ the store


@dataclass
class Store:
    uri: str
    client: Any
    experiment_ids: list[str]
    experiment_names: dict[str, str] = field(default_factory=dict)


def resolve_tracking_uri(config: Path | None, overrides: list[str], uri: str | None) -> tuple[str, str | None]:
    """(tracking URI, default experiment name): --tracking-uri, else the config's store, else $MLFLOW_TRACKING_URI."""
    from pipeline.tracking import tracking_uri

    experiment = None
    cfg = None
    if config is not None:
        cfg = load_config(config, overrides)
        experiment = cfg.tracking.experiment
    if uri:
        return uri, experiment
    if cfg is not None:
        return tracking_uri(cfg), experiment
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    raise RunsError("no MLflow store named: pass a CONFIG (its tracking.uri, by default "
                    "sqlite:///<workdir>/mlflow.db), --tracking-uri URI, or set MLFLOW_TRACKING_URI")


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a server that does not answer: MLflow's client retries for minutes before it gives up."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # it answered (a proxy without /health, an auth wall): let MLflow's own request say more
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RunsError(f"cannot reach the MLflow server at {uri}: {reason} "
                        "(is `mlflow server` running there?)") from None


def open_store(uri: str, experiment: str | None) -> Store:
    """A client on `uri` and the experiments to search: the named one, or every active one."""
    import mlflow

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        # Opening a missing sqlite file would create an empty store and report "no runs".
        raise RunsError(f"no MLflow store at {db} (tracking URI {uri}): run a stage with this config first, "
                        "or pass --tracking-uri")
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    try:
        experiments = client.search_experiments()
    except Exception as exc:  # an unreachable server or a store that is not MLflow's
        raise RunsError(f"cannot read the MLflow store {uri}: {exc}") from None
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is None:
        return Store(uri, client, list(names), names)
    chosen = [eid for eid, name in names.items() if name == experiment]
    if not chosen:
        known = ", ".join(sorted(names.values())) or "none"
        raise RunsError(f"no experiment named {experiment!r} in {uri} (experiments there: {known}); "
                        "pass --experiment NAME")
    return Store(uri, client, chosen, names)


# ------------------------------------------------------------------ querying


ORDER_BY_PREFIXES = {"metrics", "metric", "params", "param", "parameter", "parameters", "tags", "tag", "attributes",
                     "attribute", "attr", "run", "dataset", "datasets"}


def order_by(sort: Iterable[str]) -> list[str]:
    """`metrics.val_bpb`, `-metrics.val_bpb`, `val_bpb` (a metric) or MLflow's `metrics.val_bpb DESC`."""
    from mlflow.entities import RunInfo

    attributes = set(RunInfo.get_orderable_attributes())
    out = []
    for key in sort:
        key = key.strip()
        direction = "ASC"
        if key.startswith("-"):
            key, direction = key[1:], "DESC"
        parts = key.rsplit(" ", 1)
        if len(parts) == 2 and parts[1].upper() in ("ASC", "DESC"):
            key, direction = parts[0].strip(), parts[1].upper()
        prefix = key.split(".", 1)[0]
        if "." not in key and not key.startswith("`"):
            key = f"attributes.{key}" if key in attributes else f"metrics.{key}"
        elif prefix not in ORDER_BY_PREFIXES:  # a config key such as train.lr: a param (compared as text)
            key = f"params.`{key}`"
        out.append(f"{key} {direction}")
    return out


def stage_group(stage: str) -> str:
    """The table a run goes in: its stage, with every fine-tuning task together as 'finetune/'."""
    return "finetune/" if stage.startswith("finetune/") else stage


def search(store: Store, stage: str | None = None, filter_string: str = "", sort: Iterable[str] = (),
           limit: int = 100) -> tuple[list[Any], bool]:
    """The matching runs (newest first unless sorted) and whether more matched than `limit`."""
    clauses = [filter_string.strip()] if filter_string and filter_string.strip() else []
    if stage:
        # `finetune` also takes its per-task children (stage `finetune/<task>`); MLflow has no OR.
        stage = stage.replace("'", "")
        clauses.append(f"tags.{STAGE_TAG} LIKE '{stage}%'")
    try:
        runs = store.client.search_runs(store.experiment_ids, filter_string=" and ".join(clauses),
                                        order_by=order_by(sort) or None, max_results=limit + 1)
    except Exception as exc:
        raise RunsError(f"MLflow could not search runs (filter {' and '.join(clauses)!r}, sort {list(sort)}): "
                        f"{_first_line(exc)}") from None
    if stage:
        runs = [r for r in runs if stage_group(r.data.tags.get(STAGE_TAG, "")).rstrip("/") == stage]
    return list(runs[:limit]), len(runs) > limit


def stages_in(store: Store, sample: int = 500) -> list[str]:
    """The stage tags of the newest runs, for a hint when `--stage` matched nothing."""
    runs = store.client.search_runs(store.experiment_ids, max_results=sample)
    return sorted({stage_group(r.data.tags.get(STAGE_TAG, "")).rstrip("/") for r in runs} - {""})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_run(store: Store, ref: str) -> Any:
    """A run by full id, unique id prefix (as the table shows) or unique run name, in any experiment of the store."""
    from mlflow.exceptions import MlflowException

    everywhere = list(store.experiment_names) or store.experiment_ids
    if len(ref) == 32:
        try:
            return store.client.get_run(ref)
        except MlflowException:
            pass
    safe = ref.replace("'", "")
    for clause in (f"attributes.run_id LIKE '{safe}%'", f"attributes.run_name = '{safe}'"):
        matches = store.client.search_runs(everywhere, filter_string=clause, max_results=10)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(m.info.run_id[:12] for m in matches)
            raise RunsError(f"run {ref!r} is ambiguous in {store.uri}: it matches {ids}; give more of the id")
    raise RunsError(f"no run {ref!r} in {store.uri} (give a run id or its first {SHORT_ID} characters, as "
                    "`scratchgpt runs` shows them)")


# ------------------------------------------------------------------ the table


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


# ------------------------------------------------------------------ compare


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


# ------------------------------------------------------------------ lineage

UPSTREAM = {"prep": ("prep",), "tokenizer": ("prep", "tokenizer"), "shard": ("prep", "tokenizer", "shard")}
ALL_UPSTREAM = ("prep", "tokenizer", "shard")
MARKER_STAGES = ("prep", "tokenizer", "shard", "pretrain", "finetune")


@dataclass
class Lineage:
    """Where a model came from; each section holds what the files say and what the MLflow runs recorded."""

    origin: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, Any] = field(default_factory=dict)
    prep: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    markers: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("origin", "model", "tokenizer", "shards", "prep", "inputs", "markers",
                                              "warnings")}


def _run_summary(run: Any) -> dict[str, Any]:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "stage": run.data.tags.get(STAGE_TAG),
            "status": run.info.status, "experiment_id": run.info.experiment_id,
            "workdir": run.data.tags.get(WORKDIR_TAG)}


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _newest_run(store: Store | None, clauses: list[str]) -> Any:
    """The newest run matching every clause, in any experiment of the store; None without a store or a match."""
    if store is None:
        return None
    everywhere = list(store.experiment_names) or store.experiment_ids
    try:
        found = store.client.search_runs(everywhere, filter_string=" and ".join(clauses),
                                         order_by=["attributes.start_time DESC"], max_results=20)
    except Exception:
        return None
    finished = [r for r in found if r.info.status == "FINISHED"]
    return (finished or found or [None])[0]


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "") + "'"


def _run_by_id(store: Store | None, run_id: str) -> Any:
    if store is None or not run_id:
        return None
    try:
        return store.client.get_run(run_id)
    except Exception:
        return None


def lineage(ref: str, store: Store | None) -> Lineage:
    """Lineage of a run (id, id prefix or name) or of a path (export folder, checkpoint folder or workdir)."""
    path = Path(ref)
    if path.exists():
        return _lineage_of_path(path.resolve(), store)
    if store is None:
        raise RunsError(f"{ref!r} is neither a folder nor a file, and no MLflow store is named to look it up as a run: "
                        "pass a CONFIG, --tracking-uri or MLFLOW_TRACKING_URI")
    run = find_run(store, ref)
    return _lineage_of_run(run, store)


def _lineage_of_run(run: Any, store: Store) -> Lineage:
    stage = run.data.tags.get(STAGE_TAG, "")
    workdir = Path(run.data.tags[WORKDIR_TAG]) if run.data.tags.get(WORKDIR_TAG) else None
    lin = Lineage(origin={"kind": "run", **_run_summary(run)})
    if stage.startswith("finetune"):
        parent = _run_by_id(store, run.data.tags.get(PARENT_TAG, "")) if "/" in stage else run
        init_from = (parent or run).data.params.get("finetune.init_from", "None")
        if init_from not in ("None", ""):
            # The model came from another export folder: its lineage is that folder's.
            upstream = _lineage_of_path(Path(init_from), store)
            upstream.origin = lin.origin
            upstream.model["finetuned_from"] = init_from
            return upstream
        pretrain = _pretrain_run_of(workdir, store)
        lin.model = {"kind": "finetune", "task": run.data.tags.get("task"),
                     "path": str(workdir / "finetune" / run.data.tags.get("task", "")) if workdir else None,
                     "finetuned_from": str(workdir / "pretrain" / "export") if workdir else None,
                     "pretrain_run": _run_summary(pretrain) if pretrain else None}
        if pretrain is None:
            lin.warnings.append(f"no pretrain run found for workdir {workdir}: the hashes below are the workdir's "
                                "current files, not what the model was trained on")
        _fill_upstream(lin, workdir, pretrain or run, store, ALL_UPSTREAM)
        return lin
    if stage == "pretrain":
        export = workdir / "pretrain" / "export" if workdir else None
        # The stage also logs the export as the run's `export` artifacts: that copy stays with the run.
        lin.model = {"kind": "pretrain", "path": str(export) if export else None,
                     "artifacts": f"{run.info.artifact_uri}/export", "pretrain_run": _run_summary(run)}
        id_file = workdir / "pretrain" / "mlflow_run_id" if workdir else None
        if id_file is not None and id_file.is_file() and id_file.read_text().strip() != run.info.run_id:
            lin.warnings.append(f"{export} now holds the model of run {id_file.read_text().strip()[:SHORT_ID]}, not "
                                f"this run's: its own export is in the run's artifacts ({lin.model['artifacts']})")
        _fill_upstream(lin, workdir, run, store, ALL_UPSTREAM)
        return lin
    if stage in UPSTREAM:
        _fill_upstream(lin, workdir, run, store, UPSTREAM[stage])
        return lin
    raise RunsError(f"run {run.info.run_id[:SHORT_ID]} has stage tag {stage!r}: lineage is for prep, tokenizer, "
                    "shard, pretrain and finetune runs")


def _pretrain_run_of(workdir: Path | None, store: Store | None) -> Any:
    """The workdir's pretrain run: the id the stage left in pretrain/mlflow_run_id, else the newest by tag."""
    if workdir is None:
        return None
    id_file = workdir / "pretrain" / "mlflow_run_id"
    if id_file.is_file():
        run = _run_by_id(store, id_file.read_text().strip())
        if run is not None:
            return run
    return _newest_run(store, [f"tags.{STAGE_TAG} = 'pretrain'", f"tags.{WORKDIR_TAG} = {_quote(workdir)}"])


def _lineage_of_path(path: Path, store: Store | None) -> Lineage:
    lin = Lineage(origin={"kind": "path", "path": str(path)})
    checkpoint: Path | None = None
    workdir: Path | None = None
    task: str | None = None
    if (path / "config.json").is_file():  # an export folder
        lin.model = {"kind": "export", "path": str(path)}
        pointer = _read_json(path / "scratchgpt_checkpoint.json")
        if pointer and pointer.get("checkpoint"):
            checkpoint = Path(pointer["checkpoint"])
            lin.model.update(checkpoint=str(checkpoint), step=pointer.get("step"))
        elif path.parent.parent.name == "finetune":  # <workdir>/finetune/<task>/export
            workdir, task = path.parents[2], path.parent.name
            lin.model["kind"] = "finetune export"
        elif path.name == "export" and path.parent.name == "pretrain":
            workdir = path.parents[1]
        if (path / "tokenizer.json").is_file():
            from dataprep.tokenizer import tokenizer_sha256

            lin.model["tokenizer_sha256"] = tokenizer_sha256(path / "tokenizer.json")
    elif (path / "latest").is_file():  # a checkpoints folder
        checkpoint = path / (path / "latest").read_text().strip()
        lin.model = {"kind": "checkpoint", "path": str(checkpoint)}
    elif (path / "scratchgpt.json").is_file():  # one checkpoint
        checkpoint = path
        lin.model = {"kind": "checkpoint", "path": str(checkpoint)}
    elif any((path / name).is_dir() for name in ("prep", "tokenizer", "shards", "pretrain")):
        workdir = path
        export = path / "pretrain" / "export"
        lin.model = {"kind": "workdir", "path": str(export) if export.is_dir() else None}
    else:
        raise RunsError(f"{path}: not an export folder (config.json), a checkpoint folder (latest or scratchgpt.json) "
                        "or a workdir (prep/, tokenizer/, shards/ or pretrain/)")
    expected: dict[str, str] = {}
    if checkpoint is not None:
        meta = _read_json(checkpoint / "scratchgpt.json") or {}
        lin.model.setdefault("step", meta.get("step"))
        expected = {k: meta[k] for k in ("manifest_sha256", "tokenizer_sha256") if meta.get(k)}
        if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.name == "pretrain":
            workdir = checkpoint.parents[2]
        if not meta:
            lin.warnings.append(f"checkpoint {checkpoint} has no readable scratchgpt.json: its data hashes are unknown")
    if store is None and workdir is not None and (workdir / "mlflow.db").is_file():
        store = open_store(f"sqlite:///{workdir / 'mlflow.db'}", None)
    if store is None:
        lin.warnings.append("no MLflow store to link runs from (none at <workdir>/mlflow.db): pass the CONFIG, "
                            "--tracking-uri or MLFLOW_TRACKING_URI")
    run = None
    if task is not None:
        base = task.removesuffix("-scratch")
        run = _newest_run(store, [f"tags.{STAGE_TAG} = 'finetune/{base}'", f"tags.{WORKDIR_TAG} = {_quote(workdir)}"])
        lin.model["finetune_run"] = _run_summary(run) if run else None
    pretrain = _pretrain_run_of(workdir, store)
    if pretrain is not None:
        lin.model["pretrain_run"] = _run_summary(pretrain)
    source = pretrain
    if expected:  # the checkpoint's own record wins over a run's tags
        source = _Recorded(expected, pretrain)
    _fill_upstream(lin, workdir, source, store, ALL_UPSTREAM)
    return lin


@dataclass
class _Recorded:
    """The hashes a checkpoint recorded, in the shape of a run's tags and params."""

    hashes: dict[str, str]
    run: Any

    @property
    def tags(self) -> dict[str, str]:
        tags = dict(self.run.data.tags) if self.run is not None else {}
        tags[PRETRAIN_MANIFEST_TAG] = self.hashes.get("manifest_sha256", tags.get(PRETRAIN_MANIFEST_TAG, ""))
        tags[TOKENIZER_TAG] = self.hashes.get("tokenizer_sha256", tags.get(TOKENIZER_TAG, ""))
        return tags

    @property
    def params(self) -> dict[str, str]:
        return dict(self.run.data.params) if self.run is not None else {}


def _tags_params(source: Any) -> tuple[dict[str, str], dict[str, str]]:
    if source is None:
        return {}, {}
    if isinstance(source, _Recorded):
        return source.tags, source.params
    return dict(source.data.tags), dict(source.data.params)


def _fill_upstream(lin: Lineage, workdir: Path | None, source: Any, store: Store | None,
                   sections: tuple[str, ...]) -> None:
    """Tokenizer, shards, prep and raw inputs for a model (or an upstream run) recorded by `source`."""
    tags, params = _tags_params(source)
    stage = tags.get(STAGE_TAG, "")
    lin.origin.setdefault("workdir", str(workdir) if workdir else None)
    if workdir is not None and not workdir.is_dir():
        lin.warnings.append(f"workdir {workdir} is not on this machine: showing what the MLflow runs recorded")
        workdir = None
    expected_manifest = tags.get(PRETRAIN_MANIFEST_TAG) or (tags.get(SHARD_MANIFEST_TAG) if stage == "shard" else "")
    if "shard" in sections:
        _fill_shards(lin, workdir, expected_manifest, store)
    expected_tokenizer = tags.get(TOKENIZER_TAG) or lin.shards.get("tokenizer_sha256", "")
    if "tokenizer" in sections:
        _fill_tokenizer(lin, workdir, expected_tokenizer, store)
    _fill_prep(lin, workdir, tags, store)
    _fill_inputs(lin, params)
    _fill_markers(lin, workdir)


def _fill_shards(lin: Lineage, workdir: Path | None, expected: str, store: Store | None) -> None:
    from dataprep.shards import file_sha256

    section: dict[str, Any] = {"recorded_sha256": expected or None}
    path = workdir / "shards" / "manifest.json" if workdir else None
    if path is not None and path.is_file():
        section.update(path=str(path), sha256=file_sha256(path))
        manifest = _read_json(path) or {}
        section["tokenizer_sha256"] = manifest.get("tokenizer_sha256", "")
        section["vocab_size"] = manifest.get("vocab_size")
        section["splits"] = {name: {"tokens": split.get("tokens"), "docs": split.get("docs"),
                                    "bytes": split.get("bytes"), "shards": len(split.get("shards", []))}
                             for name, split in manifest.get("splits", {}).items()}
        if expected and section["sha256"] != expected:
            lin.warnings.append(f"{path} (sha256 {section['sha256'][:12]}) is not the manifest the model was "
                                f"trained on ({expected[:12]}): the shards were rebuilt since; the counts below are "
                                "from the shard run that wrote the recorded one, where the store has it")
    elif path is not None:
        lin.warnings.append(f"{path} is missing")
    wanted = expected or section.get("sha256")
    run = _newest_run(store, [f"tags.{SHARD_MANIFEST_TAG} = {_quote(wanted)}"]) if wanted else None
    if run is not None:
        section["run"] = _run_summary(run)
        if "splits" not in section or (expected and section.get("sha256") != expected):
            metrics = run.data.metrics
            section["splits"] = {s: {k: _int(metrics.get(f"{s}_{k}")) for k in ("tokens", "docs", "bytes", "shards")}
                                 for s in ("train", "val")}
            section["tokenizer_sha256"] = run.data.tags.get(TOKENIZER_TAG, "")
    lin.shards = section


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _fill_tokenizer(lin: Lineage, workdir: Path | None, expected: str, store: Store | None) -> None:
    from dataprep.tokenizer import tokenizer_sha256

    section: dict[str, Any] = {"recorded_sha256": expected or None}
    path = workdir / "tokenizer" / "tokenizer.json" if workdir else None
    if path is not None and path.is_file():
        section.update(path=str(path), sha256=tokenizer_sha256(path))
        if expected and section["sha256"] != expected:
            lin.warnings.append(f"{path} (sha256 {section['sha256'][:12]}) is not the tokenizer the model was trained "
                                f"with ({expected[:12]}): it was retrained since")
    elif path is not None:
        lin.warnings.append(f"{path} is missing")
    in_model = lin.model.get("tokenizer_sha256")
    if in_model and expected and in_model != expected:
        lin.warnings.append(f"the tokenizer.json in {lin.model.get('path')} (sha256 {in_model[:12]}) differs from the "
                            f"one the model was trained with ({expected[:12]})")
    if lin.shards.get("vocab_size"):
        section["vocab_size"] = lin.shards["vocab_size"]
    wanted = expected or section.get("sha256")
    run = (_newest_run(store, [f"tags.{STAGE_TAG} = 'tokenizer'", f"tags.{TOKENIZER_TAG} = {_quote(wanted)}"])
           if wanted else None)
    if run is not None:
        section["run"] = _run_summary(run)
        section.setdefault("vocab_size", _int(run.data.metrics.get("vocab_size")))
        section["bytes_per_token"] = run.data.metrics.get("bytes_per_token")
    lin.tokenizer = section


def _fill_prep(lin: Lineage, workdir: Path | None, tags: dict[str, str], store: Store | None) -> None:
    section: dict[str, Any] = {}
    stats_path = workdir / "prep" / "stats.json" if workdir else None
    stats = _read_json(stats_path) if stats_path is not None else None
    run = None
    if stats is not None:
        section["path"] = str(stats_path)
        counts = stats
        run = _run_by_id(store, stats.get("mlflow_run_id", ""))
        section["input_files"] = stats.get("inputs", [])
    else:
        recorded_workdir = tags.get(WORKDIR_TAG)
        if recorded_workdir:
            run = _newest_run(store, [f"tags.{STAGE_TAG} = 'prep'", f"tags.{WORKDIR_TAG} = {_quote(recorded_workdir)}"])
        counts = {k: _int(v) for k, v in run.data.metrics.items()} if run is not None else {}
        if stats_path is not None:
            lin.warnings.append(f"{stats_path} is missing or unreadable"
                                + ("; prep counts are from the prep run" if run is not None else ""))
    if run is not None:
        section["run"] = _run_summary(run)
        section["data.inputs"] = run.data.params.get("data.inputs")
    if counts:
        section.update({k: counts.get(k) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")})
        section["dropped"] = {k.removeprefix("dropped_"): v for k, v in counts.items()
                              if k.startswith("dropped_") and isinstance(v, int)}
    lin.prep = section


def _fill_inputs(lin: Lineage, params: dict[str, str]) -> None:
    configured = params.get("data.inputs") or lin.prep.get("data.inputs")
    files = []
    for name in lin.prep.get("input_files", []):
        file = Path(name)
        files.append({"path": name, "exists": file.is_file(), "bytes": file.stat().st_size if file.is_file() else None})
    lin.inputs = {"data.inputs": configured, "files": files}


def _fill_markers(lin: Lineage, workdir: Path | None) -> None:
    if workdir is None:
        return
    finished: list[tuple[str, float]] = []
    for stage in MARKER_STAGES:
        marker = _read_json(workdir / stage / "_COMPLETE.json")
        if marker is None:
            continue
        when = marker.get("finished")
        lin.markers[stage] = {"hash": marker.get("hash"), "finished": fmt_time(int(when * 1000)) if when else None}
        if when:
            finished.append((stage, when))
    for (up, up_when), (down, down_when) in zip(finished, finished[1:], strict=False):
        if up_when > down_when:
            lin.warnings.append(f"the {up} stage finished after the {down} stage in {workdir}: {down} was built from "
                                f"an older {up} output (run `scratchgpt run` to bring it up to date)")


def format_lineage(lin: Lineage) -> str:
    """The lineage as indented text, model first, raw inputs last."""
    out: list[str] = []

    def head(title: str, text: str) -> None:
        out.append(f"{title:<10} {text}")

    def more(text: str) -> None:
        out.append(f"{'':<10} {text}")

    def run_line(run: dict[str, Any] | None, what: str) -> None:
        if run:
            more(f"{what} run {run['run_id'][:SHORT_ID]} ({run['name']}, {run['status']})")

    origin = lin.origin
    if origin["kind"] == "run":
        head("lineage", f"of run {origin['run_id']} ({origin['name']}, stage {origin['stage']}, {origin['status']})")
    else:
        head("lineage", f"of {origin['path']}")
    if lin.model:
        model = lin.model
        head("model", f"{model.get('kind')}: {model.get('path') or '-'}")
        if model.get("artifacts"):
            more(f"artifacts {model['artifacts']}")
        if model.get("tokenizer_sha256"):
            more(f"its tokenizer.json: sha256 {model['tokenizer_sha256']}")
        if model.get("step") is not None:
            more(f"step {model['step']}, checkpoint {model.get('checkpoint', model.get('path'))}")
        if model.get("finetuned_from"):
            more(f"fine-tuned from {model['finetuned_from']}")
        run_line(model.get("finetune_run"), "finetune")
        run_line(model.get("pretrain_run"), "pretrain")
    if lin.tokenizer:
        tok = lin.tokenizer
        head("tokenizer", tok.get("path") or "(file not here)")
        more(f"sha256 {_hash_status(tok)}")
        extra = [f"vocab {tok['vocab_size']}" if tok.get("vocab_size") else "",
                 f"{tok['bytes_per_token']:.3f} bytes/token" if tok.get("bytes_per_token") else ""]
        if any(extra):
            more(", ".join(e for e in extra if e))
        run_line(tok.get("run"), "tokenizer")
    if lin.shards:
        shards = lin.shards
        head("shards", shards.get("path") or "(manifest not here)")
        more(f"sha256 {_hash_status(shards)}")
        for name, split in (shards.get("splits") or {}).items():
            more(f"{name}: {_num(split.get('tokens'))} tokens, {_num(split.get('docs'))} docs, "
                 f"{_num(split.get('bytes'))} bytes in {_num(split.get('shards'))} shard(s)")
        run_line(shards.get("run"), "shard")
    prep = lin.prep
    head("prep", prep.get("path") or "(stats.json not here)")
    if prep.get("docs_in") is not None:
        more(f"docs in {_num(prep['docs_in'])}, out {_num(prep.get('docs_out'))}; "
             f"bytes in {_num(prep.get('bytes_in'))}, out {_num(prep.get('bytes_out'))}")
        dropped = prep.get("dropped") or {}
        if dropped:
            more("dropped: " + ", ".join(f"{k} {_num(v)}" for k, v in dropped.items()))
    else:
        more("no prep counts found")
    run_line(prep.get("run"), "prep")
    head("inputs", f"data.inputs = {lin.inputs.get('data.inputs') or '(not recorded)'}")
    for file in lin.inputs.get("files", []):
        state = f"{_num(file['bytes'])} bytes" if file["exists"] else "MISSING"
        more(f"{file['path']} ({state})")
    if lin.markers:
        head("markers", ", ".join(f"{stage} {m['finished'] or '?'}" for stage, m in lin.markers.items()) + " (UTC)")
    for warning in lin.warnings:
        out.append(f"warning: {warning}")
    return "\n".join(out)


def _hash_status(section: dict[str, Any]) -> str:
    now, recorded = section.get("sha256"), section.get("recorded_sha256")
    if now and recorded:
        return f"{now} (matches the run's record)" if now == recorded else f"{now} (the run recorded {recorded})"
    if recorded:
        return f"{recorded} (as recorded; file not checked)"
    return f"{now} (no record to check against)" if now else "unknown"


def _num(value: Any) -> str:
    return "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
