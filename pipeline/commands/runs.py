"""`scratchgpt runs`: the table of runs in an experiment, `--compare` with a loss-curve PNG, `--lineage`.

The logic is in pipeline.runs.store (finding and searching the store), runs_table, runs_compare
and runs_lineage; they are imported inside the functions below, so mlflow and matplotlib load only
when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "runs",
        help="list, compare and trace the MLflow runs of the pipeline",
        description="A table of the runs in an experiment (stage, key params, final metrics, duration, data manifest "
        "hash), grouped by stage; --compare RUN RUN... shows the params that differ and the final metrics side by "
        "side and writes a PNG of the loss curves; --lineage RUN|PATH shows the tokenizer, shards, prep stats and "
        "raw inputs a model came from. The store is --tracking-uri, else the CONFIG's (tracking.uri, by default "
        "sqlite:///<workdir>/mlflow.db), else $MLFLOW_TRACKING_URI.",
    )
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML config whose MLflow store to read")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="override single config keys")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (sqlite:///path/mlflow.db, http://host:port)")
    p.add_argument("--experiment", default=None,
                   help="experiment name (default: the config's tracking.experiment; without a config, all of them)")
    p.add_argument("--stage", default=None, help="only runs of this stage (finetune includes its per-task runs)")
    p.add_argument("--filter", default="", metavar="FILTER",
                   help="MLflow search filter, e.g. \"metrics.val_bpb < 2 and params.model.n_layer = '4'\"")
    p.add_argument("--sort", action="append", default=[], metavar="KEY",
                   help="metrics.val_bpb (ascending), =-metrics.val_bpb (descending: write --sort=-KEY so the minus "
                   "is not read as an option), a bare metric name, a config key such as train.lr (a param, "
                   "compared as text), or MLflow's 'metrics.val_bpb DESC'; repeat for ties (default: newest first)")
    p.add_argument("--limit", type=int, default=100, help="at most this many runs (default 100)")
    p.add_argument("--csv", action="store_true", help="CSV on stdout: every param and final metric, full hashes")
    p.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                   help="run ids (or their first 8 characters, or unique run names) to compare")
    p.add_argument("--out", type=Path, default=None, help="PNG path for --compare (default: runs_compare.png)")
    p.add_argument("--metric", default=None,
                   help="curve to plot for --compare (default: val_bpb, else the first of eval_loss, val_loss, "
                   "train_loss that the runs logged)")
    p.add_argument("--lineage", metavar="RUN|PATH", default=None,
                   help="a pretrain or finetune run, an export or checkpoint folder, or a workdir")
    p.add_argument("--json", action="store_true", help="with --lineage: print it as JSON")
    p.set_defaults(func=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.runs.store import RunsError, open_store, resolve_tracking_uri, search, stages_in
    from pipeline.runs.table import format_runs, runs_csv

    if args.compare is not None and args.lineage is not None:
        raise RunsError("--compare and --lineage are separate views: give one of them")
    if args.limit < 1:
        raise RunsError(f"--limit must be at least 1, got {args.limit}")
    if args.lineage is not None:
        return _lineage(args)
    uri, experiment = resolve_tracking_uri(args.config, args.overrides, args.tracking_uri)
    if args.compare is not None:
        # Run ids are unique across a store, so --compare looks in every experiment.
        store = open_store(uri, None)
        return _compare(args, store)
    store = open_store(uri, args.experiment or experiment)
    found, more = search(store, args.stage, args.filter, args.sort, args.limit)
    if args.csv:
        sys.stdout.write(runs_csv(found, store.experiment_names))
    else:
        print(format_runs(found, more, args.limit))
        if not found and args.stage:
            print(f"(stages with runs here: {', '.join(stages_in(store)) or 'none'})")
    return 0


def _compare(args: argparse.Namespace, store: object) -> int:
    from pipeline.runs.compare import compare, plot_curves
    from pipeline.runs.store import RunsError, find_run

    if len(args.compare) < 2:
        raise RunsError("--compare needs at least two runs")
    chosen = [find_run(store, ref) for ref in args.compare]
    comparison = compare(chosen)
    print(comparison.text)
    path, notes = plot_curves(store, comparison, args.out or Path("runs_compare.png"), args.metric)
    for note in notes:
        print(f"note: {note}")
    print(f"\nLoss curves written to {path.resolve()}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    import json
    import os

    from pipeline.runs.lineage import format_lineage, lineage
    from pipeline.runs.store import open_store, resolve_tracking_uri

    store = None
    if args.tracking_uri or args.config is not None or os.environ.get("MLFLOW_TRACKING_URI"):
        uri, _ = resolve_tracking_uri(args.config, args.overrides, args.tracking_uri)
        store = open_store(uri, None)
    found = lineage(args.lineage, store)
    print(json.dumps(found.to_dict(), indent=2, default=str) if args.json else format_lineage(found))
    return 0
