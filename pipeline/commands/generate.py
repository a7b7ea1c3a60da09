"""`scratchgpt generate`: stream a sampled continuation of a prompt from an export folder or a checkpoint.

Imports torch only when the command runs, so `scratchgpt --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Any

from dataprep.errors import ScratchgptError
from pipeline.commands.export import split_checkpoint_arg
from pipeline.core.workdir import Workdir

DEVICE_FORMS = re.compile(r"cpu|mps|cuda(:\d+)?")  # what generation runs on; torch knows many more it cannot use


class GenerateArgError(ScratchgptError, ValueError):
    """A --model or --device that generate cannot use; the message names it."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a trained model (export folder, checkpoint folder or workdir)",
        description="Stream a continuation of --prompt to stdout, sampled with the KV cache. --model is an export "
        "folder (config.json + model.safetensors + tokenizer files), a checkpoint folder (the one holding "
        "`latest`), one checkpoint inside it (step_*), or a workdir (its pretrain/export, else "
        "pretrain/checkpoints).",
    )
    p.add_argument("--model", type=Path, required=True,
                   help="export folder, checkpoint folder, one step_* checkpoint, or workdir")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-text token)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens summing to p")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: a random one, printed)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder (default: the export folder, or <workdir>/tokenizer for a checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    p.set_defaults(func=cmd_generate)


def _is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _is_checkpoints(path: Path) -> bool:
    return (path / "latest").is_file()


def resolve_model(path: Path) -> tuple[str, Path, str | None]:
    """("export" | "checkpoint", folder, checkpoint tag or None for `latest`) for what --model names; a clear error
    listing what was looked for."""
    if not path.exists():
        raise GenerateArgError(f"--model {path} does not exist")
    path = path.resolve()  # `--model .` inside a checkpoint folder still has the workdir above it
    ckpt_dir, tag = split_checkpoint_arg(path)
    if tag is not None:  # one step_* folder, as `export` takes it
        return "checkpoint", ckpt_dir, tag
    for kind, folder in (
        ("export", path),
        ("checkpoint", path),
        ("export", Workdir(path).export),
        ("checkpoint", Workdir(path).checkpoints),
    ):
        if (_is_export if kind == "export" else _is_checkpoints)(folder):
            return kind, folder, None
    raise GenerateArgError(
        f"--model {path}: found neither an export (config.json and model.safetensors), nor a checkpoint folder "
        f"(a `latest` file) or one step_* checkpoint in it, nor a workdir holding pretrain/export or "
        f"pretrain/checkpoints"
    )


def load_for_generation(path: Path, tokenizer_dir: Path | None) -> tuple[Any, Path]:
    """The model (eval mode, fp32 on CPU) and the tokenizer folder to use with it."""
    kind, folder, tag = resolve_model(path)
    if kind == "export":
        from training.export import load_gpt

        model, _ = load_gpt(folder)
        return model.eval(), tokenizer_dir or folder
    # A checkpoint: join its ZeRO partitions in this process (the trainer's reader), then build the model.
    from training.checkpoint import full_state_dict
    from training.export import gpt_from_state_dict
    from training.model import GPTConfig

    state, meta = full_state_dict(folder, tag)
    model = gpt_from_state_dict(state, GPTConfig.from_dict(meta["model_config"]),
                                where=f"checkpoint {folder / meta['tag']}")
    return model.eval(), tokenizer_dir or Workdir(folder.parents[1]).tokenizer  # <workdir>/pretrain/checkpoints


def pick_device(asked: str | None) -> Any:
    """The torch device for --device (default: cuda when there is one); one line for a form or device not here."""
    import torch

    if asked is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_FORMS.fullmatch(asked):
        raise GenerateArgError(f"--device {asked!r}: use cpu, cuda, cuda:N or mps")
    device = torch.device(asked)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateArgError(f"--device {asked}, but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GenerateArgError(f"--device {asked}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                               f"numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GenerateArgError(f"--device {asked}, but torch sees no MPS device here")
    return device


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from dataprep.text_input import check_utf8
    from training.sampling import check_sampling_args, stream_text

    try:
        check_utf8(args.prompt, "--prompt")
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        device = pick_device(args.device)  # before the model loads, which can take a while
        # stdout carries only the text: libraries that log to stdout on import (DeepSpeed) go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            model, tokenizer_dir = load_for_generation(args.model, args.tokenizer)
        tokenizer_file = tokenizer_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: pass --tokenizer DIR holding tokenizer.json")
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: the trainer's CheckpointError
        print(f"scratchgpt generate: {exc}", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    from training.export import tokenizer_eos_id

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos_id = tokenizer_eos_id(tokenizer_dir)
    if eos_id is None and not args.prompt:
        print(f"scratchgpt generate: {tokenizer_file} has no end-of-text token to start from; give --prompt",
              file=sys.stderr)
        return 2
    model.to(device)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = time.perf_counter()
    sys.stdout.write(args.prompt)
    with autocast:
        for piece in stream_text(
            model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            generator, None if args.ignore_eos else eos_id, device, start_id=eos_id,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[generate] seed {seed}, {time.perf_counter() - started:.2f} s", file=sys.stderr)
    return 0
