"""`scratchgpt predict`: labels and probabilities for new text from a fine-tuned classifier."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_commands(sub: Any) -> None:
    p = sub.add_parser("predict", help="label text with a fine-tuned classifier",
                       description="Label each line of a file (or stdin) with a fine-tuned classifier export.")
    p.add_argument("--model", type=Path, required=True, help="classifier export, e.g. <workdir>/finetune/sst2/export")
    p.add_argument("--file", type=Path, help="text file, one example per line (default: stdin)")
    p.add_argument("--json", action="store_true", help="JSON lines with every label's probability")
    p.add_argument("--batch-size", type=int, default=64)
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


def cmd_predict(args: argparse.Namespace) -> int:
    try:
        from dataprep.text_input import read_text_lines

        source = args.file.open("rb") if args.file else sys.stdin.buffer
        with source:
            texts = read_text_lines(source, str(args.file or "stdin"))  # UTF-8, not empty, or one line naming it
        rows = predict(args.model, texts, args.batch_size)
    except (OSError, ValueError) as exc:  # a missing file or model, not a classifier export, bad UTF-8
        print(f"scratchgpt predict: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")
    return 0
