"""`scratchgpt predict`: labels and probabilities for new text from a fine-tuned classifier."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

from dataprep.errors import ScratchgptError
from dataprep.text_input import read_text_lines


def add_commands(sub: Any) -> None:
    p = sub.add_parser("predict", help="label text with a fine-tuned classifier",
                       description="Label each line of a file (or stdin) with a fine-tuned classifier export: one "
                       "output row per input line, in order; a blank line gets a blank row (--json: null label).")
    p.add_argument("--model", type=Path, required=True, help="classifier export, e.g. <workdir>/finetune/sst2/export")
    p.add_argument("--file", type=Path, help="text file, one example per line (default: stdin)")
    p.add_argument("--json", action="store_true", help="JSON lines with every label's probability")
    p.add_argument("--batch-size", type=int, default=64, help="lines labelled at once (at least 1)")
    p.set_defaults(func=cmd_predict)


def predict(folder: Path, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
    import torch
    from tokenizers import Tokenizer

    from training.classifier import load_classifier, read_labels
    from training.finetune import pad_batch
    from training.tasks import truncate

    model, labels, pad = load_classifier(folder)
    side = read_labels(folder)["truncate"]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    block = model.gpt.config.block_size
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            # Long texts are cut on the side the task was trained and evaluated with.
            rows = [truncate(enc.ids or [pad], block, side)[0] for enc in tokenizer.encode_batch(chunk)]
            ids, lengths = pad_batch(rows, pad)
            probs = torch.softmax(model(ids, lengths)[0].float(), dim=-1)
            for text, p in zip(chunk, probs, strict=True):
                best = int(p.argmax())
                results.append({"text": text, "label": labels[best], "probability": float(p[best]),
                                "probabilities": {label: float(v) for label, v in zip(labels, p, strict=True)}})
    return results


class PredictInputError(ScratchgptError, ValueError):
    """A bad `predict` option or input file; the message names it."""


def read_lines(source: BinaryIO, name: str) -> list[str]:
    """Every line of `source`, blank ones included, so each output row answers the input line in its place.
    The input must be UTF-8 and hold some text, or one line says which line is not."""
    data = source.read()
    read_text_lines(io.BytesIO(data), name)  # the checks; it drops blank lines, which we keep
    return [raw.decode("utf-8").rstrip("\r\n") for raw in io.BytesIO(data)]


def _source(file: Path | None) -> BinaryIO:
    if file is None:
        return sys.stdin.buffer
    if not file.exists() or file.is_dir():  # a pipe (`--file <(cmd)`, /dev/stdin) is fine
        raise PredictInputError(f"--file {file}: {'a folder, not a file' if file.is_dir() else 'no such file'}")
    return file.open("rb")


def predict_lines(folder: Path, lines: list[str], batch_size: int) -> list[dict[str, Any] | None]:
    """predict() for each non-blank line; None in the place of a blank one."""
    labelled = iter(predict(folder, [line for line in lines if line.strip()], batch_size))
    return [next(labelled) if line.strip() else None for line in lines]


def _print_row(row: dict[str, Any] | None, line: str, as_json: bool) -> None:
    if as_json:
        blank = {"text": line, "label": None, "probability": None, "probabilities": None}
        print(json.dumps(row if row is not None else blank, ensure_ascii=False))
    elif row is None:
        print()  # a blank line answers a blank line: the rows stay in step with the input
    else:
        print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")


def cmd_predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise PredictInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    with _source(args.file) as source:
        lines = read_lines(source, str(args.file or "stdin"))
    try:
        rows = predict_lines(args.model, lines, args.batch_size)
    except (OSError, ValueError) as exc:  # a missing model, or a folder that is not a classifier export
        raise PredictInputError(str(exc)) from None
    for row, line in zip(rows, lines, strict=True):
        _print_row(row, line, args.json)
    return 0
