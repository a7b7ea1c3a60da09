"""`scratchgpt submit` and `scratchgpt status`: the whole chain as Slurm jobs, and where each stage stands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit every incomplete stage as a Slurm job, chained with afterok",
        description="Render one batch script per incomplete stage (prep, tokenizer, shard, pretrain, finetune) from "
        "the config's slurm section, keep them in <workdir>/slurm/, and submit them with afterok dependencies. "
        "Prints the job ids and log paths; records them in <workdir>/slurm/jobs.json for `scratchgpt status`.",
    )
    p.add_argument("config", type=Path, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="override single keys")
    p.add_argument("--dry-run", action="store_true", help="print the batch scripts; write and submit nothing")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser(
        "status",
        help="where each stage of a submitted workdir stands (complete, pending, running, failed)",
        description="Read <workdir>/slurm/jobs.json and each stage's completion marker; ask Slurm (scontrol) about "
        "the jobs of stages not complete yet. Exit status 1 when a stage failed or was cancelled.",
    )
    p.add_argument("workdir", type=Path, help="the config's workdir")
    p.set_defaults(func=cmd_status)


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.slurm.submit import submit

    submit(load_config(args.config, args.overrides), dry_run=args.dry_run)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.slurm.submit import format_status, status

    rows = status(args.workdir)
    print(format_status(rows))
    return 1 if any(row.failed for row in rows) else 0
