"""The `scratchgpt` command: one subcommand per stage, plus `run` for the whole chain."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.commands.args import add_config_args
from pipeline.config import load_config
from pipeline.core.runner import guard, run_stage
from pipeline.core.stages import STAGES


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_stage(args: argparse.Namespace) -> int:
    spec = STAGES[args.command]
    switched = [override for flag, override, _ in spec.flags if getattr(args, _dest(flag))]
    switched += [f"{key}={getattr(args, _dest(flag))}" for flag, key, _ in spec.options
                 if getattr(args, _dest(flag)) is not None]
    args.cfg = load_config(args.config, [*args.overrides, *switched])
    run_stage(args.cfg, args.command, force=args.force)
    return 0


# Modules that add their own subcommands with `add_commands(subparsers)`. They must
# import lightly at module level (torch, deepspeed and datatrove inside functions).
COMMAND_MODULES: list[str] = ["pipeline.commands.run", "pipeline.commands.generate", "pipeline.commands.export",
                              "pipeline.commands.predict", "pipeline.commands.slurm", "pipeline.commands.runs"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt", description="Raw text to a pretrained GPT, one config file."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the stage even if it is complete")
        for flag, override, text in stage.flags:
            p.add_argument(flag, action="store_true", help=f"{text} (same as {override})")
        for flag, key, text in stage.options:
            p.add_argument(flag, metavar="N", help=f"{text} (same as {key}=N)")
        p.set_defaults(func=cmd_stage)
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
        code = guard(args.command, lambda: args.func(args), lambda: getattr(args, "cfg", None))
    except SystemExit as exc:  # a stage stopped by a signal exits 0 from inside: leave together below, then exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        leave_process_group(code)
        raise
    leave_process_group(code)
    return code


def leave_process_group(code: int) -> None:
    """Under torchrun, ranks that finished well leave together: one that exits while another still holds the gloo
    context aborts ("terminate called without an active exception") and the launch fails."""
    dist = sys.modules.get("torch.distributed")
    if code != 0 or dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
