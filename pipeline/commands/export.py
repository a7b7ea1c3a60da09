"""`scratchgpt export`: a DeepSpeed checkpoint folder -> a Hugging Face GPT-2 folder.

Imports torch and DeepSpeed only when the command runs, so `scratchgpt --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.workdir import Workdir


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="join a checkpoint's ZeRO partitions and write a Hugging Face GPT-2 folder",
        description="Join the ZeRO partitions of a pretraining checkpoint into full fp32 weights and write "
        "config.json, model.safetensors and the tokenizer files, which GPT2LMHeadModel.from_pretrained and "
        "AutoTokenizer.from_pretrained load offline.",
    )
    p.add_argument("checkpoints", type=Path,
                   help="checkpoint folder (<workdir>/pretrain/checkpoints, the one holding `latest`), or one "
                        "checkpoint inside it (.../step_00000200)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <workdir>/pretrain/export beside the checkpoints)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder to copy in (default: <workdir>/tokenizer beside the checkpoints)")
    p.set_defaults(func=cmd_export)


def _split_checkpoint_arg(path: Path) -> tuple[Path, str | None]:
    """The checkpoint folder and tag: the folder with `latest`, or a tag folder inside it."""
    from training.checkpoint import META

    if (path / META).is_file():
        return path.parent, path.name
    return path, None


def cmd_export(args: argparse.Namespace) -> int:
    from dataprep.errors import ScratchgptError
    from training.export import export_checkpoint

    ckpt_dir, tag = _split_checkpoint_arg(args.checkpoints)
    workdir = Workdir(ckpt_dir.parents[1]) if len(ckpt_dir.parents) > 1 else Workdir(ckpt_dir)  # <workdir>/pretrain/…
    out = args.out or workdir.export
    tokenizer = args.tokenizer or workdir.tokenizer
    if args.tokenizer is not None and not (tokenizer / "tokenizer.json").is_file():
        raise ScratchgptError(f"{tokenizer / 'tokenizer.json'} does not exist (--tokenizer)")
    folder = export_checkpoint(ckpt_dir, out, tokenizer if tokenizer.is_dir() else None, tag)
    print(f"exported {ckpt_dir if tag is None else ckpt_dir / tag} -> {folder}")
    if not (folder / "tokenizer.json").is_file():
        print("  (no tokenizer copied: pass --tokenizer DIR so AutoTokenizer can load the folder)")
    return 0
