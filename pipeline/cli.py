"""The `scratchgpt` command: one subcommand per stage, plus `run` for the whole chain."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, load_config
from pipeline.core.stages import STAGES, is_complete, start_clean, write_marker


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="override single keys")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def print_summary(name: str, summary: dict[str, Any], seconds: float) -> None:
    print(f"\n[{name}] done in {seconds:.1f} s")
    for key, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
            print(f"  {key}: {inner}")
        elif isinstance(value, float):
            print(f"  {key}: {value:.4g}")
        else:
            print(f"  {key}: {value}")


def run_stage(cfg: Config, name: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless its completion marker says it is done with this config."""
    if not force and is_complete(cfg, name):
        print(f"[{name}] complete, skipped (delete {Path(cfg.workdir) / name} or pass --force to redo)")
        return None
    started = time.time()
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun/srun every rank runs this
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # Work left by another config is removed first; a multi-process launch had that done by its launcher.
        start_clean(cfg, name, force)
    if main_rank:
        print(f"[{name}] starting: {STAGES[name].help}")
    summary = STAGES[name].run(cfg)
    if main_rank:
        write_marker(cfg, name, summary, started)
        print_summary(name, summary, time.time() - started)
    return summary


def cmd_stage(args: argparse.Namespace) -> int:
    switched = [override for flag, override, _ in STAGES[args.command].flags if getattr(args, _dest(flag))]
    cfg = load_config(args.config, [*args.overrides, *switched])
    run_stage(cfg, args.command, force=args.force)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.executor == "slurm":  # the same chain, as Slurm jobs (scratchgpt submit)
        from pipeline.slurm.submit import submit

        submit(cfg)
        return 0
    from pipeline.commands.run import closing_report, run_pipeline

    run_pipeline(cfg, force=args.force)
    print(closing_report(cfg))
    return 0


# Modules that add their own subcommands with `add_commands(subparsers)`. They must
# import lightly at module level (torch, deepspeed and datatrove inside functions).
COMMAND_MODULES: list[str] = ["pipeline.commands.generate", "pipeline.commands.export", "pipeline.commands.predict",
                              "pipeline.commands.slurm", "pipeline.commands.runs"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt", description="Raw text to a pretrained GPT, one config file."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the stage even if it is complete")
        for flag, override, text in stage.flags:
            p.add_argument(flag, action="store_true", help=f"{text} (same as {override})")
        p.set_defaults(func=cmd_stage)
    p = sub.add_parser("run", help="run every stage in order, skipping complete ones")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.set_defaults(func=cmd_run)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also come after flags (`scratchgpt submit c.yaml --dry-run train.lr=1e-3`).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"scratchgpt: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scratchgpt: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
