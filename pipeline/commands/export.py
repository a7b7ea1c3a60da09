"""`scratchgpt export`: a DeepSpeed checkpoint folder -> a Hugging Face GPT-2 folder.

Imports torch and DeepSpeed only when the command runs, so `scratchgpt --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dataprep.errors import ScratchgptError
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
                   help="output folder: new, empty, or an earlier export, which is replaced (default: "
                        "<workdir>/pretrain/export beside the checkpoints)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder to copy in (default: <workdir>/tokenizer beside the checkpoints)")
    p.set_defaults(func=cmd_export)


class ExportOutError(ScratchgptError):
    """An --out that is not a folder export may write into; the message names it."""


def split_checkpoint_arg(path: Path) -> tuple[Path, str | None]:
    """The checkpoint folder and tag: the folder with `latest`, or a tag folder inside it."""
    from training.checkpoint import META

    if (path / META).is_file():
        return path.parent, path.name
    return path, None


def check_out_folder(out: Path) -> None:
    """--out is new, empty, or an earlier export (replaced in place); anything else would mix its files with ours."""
    from training.export import CONFIG_FILE, WEIGHTS_FILE

    if out.exists() and not out.is_dir():
        raise ExportOutError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not ((out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()):
        raise ExportOutError(f"--out {out} is a folder holding other files, not an earlier export "
                             f"({CONFIG_FILE} and {WEIGHTS_FILE}): give a new or empty folder")


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_checkpoint

    ckpt_dir, tag = split_checkpoint_arg(args.checkpoints)
    workdir = Workdir(ckpt_dir.parents[1]) if len(ckpt_dir.parents) > 1 else Workdir(ckpt_dir)  # <workdir>/pretrain/…
    out = args.out or workdir.export
    check_out_folder(out)  # before the checkpoint is read: that can take minutes
    tokenizer = args.tokenizer or workdir.tokenizer
    if args.tokenizer is not None and not (tokenizer / "tokenizer.json").is_file():
        raise ScratchgptError(f"{tokenizer / 'tokenizer.json'} does not exist (--tokenizer)")
    folder = export_checkpoint(ckpt_dir, out, tokenizer if tokenizer.is_dir() else None, tag)
    print(f"exported {ckpt_dir if tag is None else ckpt_dir / tag} -> {folder}")
    if not (folder / "tokenizer.json").is_file():
        print("  (no tokenizer copied: pass --tokenizer DIR so AutoTokenizer can load the folder)")
    return 0
