"""`scratchgpt run`: every stage in order under one parent MLflow run, then where everything is.

A stage whose completion marker matches the config is skipped; a stage whose
config sections or upstream stages changed is redone, and so is everything
after it (the marker hash chains through the upstream hashes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from pipeline.commands.args import add_config_args
from pipeline.config import Config, load_config
from pipeline.core.lock import workdir_lock
from pipeline.core.runner import is_done, run_stage
from pipeline.core.stages import STAGES
from pipeline.core.tracking import check_reachable, stage_run, tracking_uri
from pipeline.core.workdir import workdir_of
from pipeline.redact import redact

PARENT_ENV = "SCRATCHGPT_PARENT_RUN_ID"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run every stage in order, skipping complete ones")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    args.cfg = cfg = load_config(args.config, args.overrides)
    if cfg.executor == "slurm":  # the same chain, as Slurm jobs (scratchgpt submit)
        from pipeline.slurm.submit import submit

        submit(cfg)
        return 0
    run_pipeline(cfg, force=args.force)
    print(closing_report(cfg))
    return 0


def run_pipeline(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Run the chain under one lock; returns {stage: summary, or None when it was skipped}."""
    with workdir_lock(workdir_of(cfg).lock, "run"):
        return _run_chain(cfg, force)


def _run_chain(cfg: Config, force: bool) -> dict[str, Any]:
    pending = [name for name in STAGES if force or not is_done(cfg, name)]
    if not pending:
        print("Every stage is complete for this config; nothing to do (pass --force to redo).")
        return dict.fromkeys(STAGES)
    results: dict[str, Any] = {}
    check_reachable(tracking_uri(cfg))  # MLflow's own client would retry for minutes
    with stage_run(cfg, "pipeline", sections=tuple(Config.model_fields), tags={"stages": ",".join(pending)}) as run:
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id  # stage runs (and their subprocesses) nest under this one
        try:
            for name in STAGES:
                results[name] = run_stage(cfg, name, force=force)
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous
    return results


def sample_lines(export: Path, prompt: str, tokens: int = 60, seed: int = 0) -> str:
    """A short seeded sample from the export, for the closing report."""
    import torch
    from tokenizers import Tokenizer

    from training.export import load_gpt, tokenizer_eos_id
    from training.sampling import stream_text

    model, _ = load_gpt(export)
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    eos = tokenizer_eos_id(export)
    generator = torch.Generator().manual_seed(seed)
    pieces = stream_text(model.eval(), tokenizer, prompt, tokens, 0.8, 40, None, generator, eos, "cpu", start_id=eos)
    return prompt + "".join(pieces)


def shell_command(program: str, *args: str) -> str:
    """A line to paste into a shell: this installation's `program` (relative to the current directory when it is
    below it) and the arguments quoted (workdirs with spaces)."""
    path = Path(sys.executable).parent / program
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path.cwd())
    return " ".join(shlex.quote(str(part)) for part in (path, *args))


def closing_report(cfg: Config) -> str:
    """Where the model, the MLflow store and the fine-tuned tasks are, and a few generated lines."""
    paths = workdir_of(cfg)
    work = paths.root.resolve()
    uri = redact(tracking_uri(cfg))
    lines = ["", "=" * 72, f"Workdir:        {work}"]
    export = paths.export.resolve()
    if (export / "config.json").is_file():
        lines.append(f"Model:          {export}  (transformers.GPT2LMHeadModel.from_pretrained)")
    for task in cfg.finetune.tasks:
        for scratch in (False, True):
            if (paths.task(task.name, scratch) / "export").is_dir():
                lines.append(f"Task model:     {(paths.task(task.name, scratch) / 'export').resolve()}")
    lines.append(f"MLflow store:   {uri}  (experiment {cfg.tracking.experiment!r})")
    ui = ["--backend-store-uri", uri] if uri.startswith(("sqlite:", "file:")) else []
    lines.append(f"Browse runs:    {shell_command('mlflow', 'ui', *ui, '--port', '5000')}")
    lines.append(f"Compare runs:   {shell_command('scratchgpt', 'runs', str(cfg.source or 'CONFIG'))}")
    if (export / "config.json").is_file():
        lines += ["", f"Sample (prompt {cfg.train.sample_prompt!r}, seed 0):", "-" * 72]
        lines.append(sample_lines(export, cfg.train.sample_prompt))
        lines.append("-" * 72)
        more = shell_command("scratchgpt", "generate", "--model", str(export), "--prompt", cfg.train.sample_prompt)
        lines.append(f"More: {more}")
    return "\n".join(lines)
