"""`scratchgpt tokenizer`: train the byte-level BPE on the clean documents of the prep stage.

Documents are cut into pieces at line ends; a `tokenizer.heldout_fraction` of the
pieces (chosen by a hash of their text, so the same on every run) is held back from training
and measures bytes per token. `tokenizer.sample_bytes` trains on a uniform
sample of about that many bytes instead of everything.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.core.runner import StageContext
from pipeline.core.tracking import TOKENIZER_TAG
from pipeline.core.workdir import workdir_of

# Held-back pieces kept in memory to measure bytes per token; more would only cost memory.
HELDOUT_MAX_CHARS = 8 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
PREP_GLOB = "*.jsonl*"  # .jsonl, .jsonl.gz, .jsonl.zst as datatrove's JsonlWriter writes them


class StageInputError(ConfigError):
    """What a stage needs is not there (an earlier stage not run, a malformed input in strict mode).

    A ConfigError so that the CLI prints the message without a traceback.
    """


def prep_output(cfg: Config) -> Path:
    """The clean documents folder; an error saying what to run when it holds none."""
    folder = workdir_of(cfg).prep_output
    if not folder.is_dir() or not any(folder.glob(PREP_GLOB)):
        raise StageInputError(f"no clean documents ({PREP_GLOB}) in {folder}: run `scratchgpt prep CONFIG` first")
    return folder


def tokenizer_output(cfg: Config) -> Path:
    """The trained tokenizer's folder; an error saying what to run when it is not there."""
    folder = workdir_of(cfg).tokenizer
    if not (folder / "tokenizer.json").is_file():
        raise StageInputError(f"no tokenizer in {folder}: run `scratchgpt tokenizer CONFIG` first")
    return folder


def clean_texts(folder: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of every clean document, read with datatrove's JsonlReader."""
    from datatrove.pipeline.readers import JsonlReader

    reader = JsonlReader(str(folder), glob_pattern=PREP_GLOB, recursive=False)
    for doc in reader():
        yield str(doc.id), doc.text


class TrainingSample:
    """Splits the clean documents into the pieces the trainer sees and the pieces held back."""

    def __init__(self, folder: Path, heldout_fraction: float, sample_bytes: int | None):
        self.folder = folder
        self.heldout_fraction = heldout_fraction
        self.sample_rate = 1.0
        if sample_bytes is not None:
            total = sum(len(text.encode("utf-8")) for _, text in clean_texts(folder))
            self.sample_rate = min(1.0, sample_bytes / max(1, total * (1 - heldout_fraction)))
        self.heldout: list[str] = []
        self.heldout_chars = 0
        self.train_bytes = 0
        self.train_docs = 0

    def __iter__(self) -> Iterator[str]:
        from dataprep.tokenizer import split_pieces, unit_hash

        for _, text in clean_texts(self.folder):
            used = False
            for piece in split_pieces(text):
                # By content, not position: a piece repeated across documents (boilerplate,
                # syndicated copies) is held back everywhere or nowhere.
                key = piece
                if unit_hash("heldout:" + key) < self.heldout_fraction:
                    if self.heldout_chars < HELDOUT_MAX_CHARS:
                        self.heldout.append(piece)
                        self.heldout_chars += len(piece)
                    continue
                if self.sample_rate < 1.0 and unit_hash("sample:" + key) >= self.sample_rate:
                    continue
                self.train_bytes += len(piece.encode("utf-8"))
                used = True
                yield piece
            self.train_docs += used


def digest(cfg: Config) -> str:
    from dataprep.tokenizer import tokenizer_sha256

    return tokenizer_sha256(workdir_of(cfg).tokenizer)


def verify(cfg: Config, marker: dict[str, Any]) -> str:
    """tokenizer.json is still the one this stage wrote."""
    if marker.get("digest") and digest(cfg) != marker["digest"]:
        return f"{workdir_of(cfg).tokenizer / 'tokenizer.json'} changed since it finished"
    return ""


def run(ctx: StageContext) -> dict[str, Any]:
    import mlflow

    from dataprep.tokenizer import bytes_per_token, save_tokenizer, tokenizer_sha256, train_tokenizer

    cfg = ctx.cfg
    tc = cfg.tokenizer
    folder = prep_output(cfg)
    out_dir = ctx.paths.tokenizer
    started = time.time()
    sample = TrainingSample(folder, tc.heldout_fraction, tc.sample_bytes)
    tok = train_tokenizer(sample, tc.vocab_size, tc.min_frequency, tc.eot_token)
    train_seconds = time.time() - started
    if sample.train_bytes == 0:
        raise StageInputError(f"no text to train the tokenizer on in {folder} "
                              f"(tokenizer.sample_bytes={tc.sample_bytes}, heldout_fraction={tc.heldout_fraction})")
    path = save_tokenizer(tok, out_dir, tc.eot_token)
    measured_on = "heldout"
    texts = sample.heldout
    if not texts:  # a corpus too small to hold anything back: say so rather than log nothing
        measured_on = "train"
        texts = [t for _, t in clean_texts(folder)]
    bpt = bytes_per_token(tok, texts)
    summary = {
        "vocab_size": tok.get_vocab_size(),
        "bytes_per_token": bpt,
        "bytes_per_token_on": measured_on,
        "train_bytes": sample.train_bytes,
        "train_docs": sample.train_docs,
        "heldout_pieces": len(sample.heldout),
        "train_seconds": train_seconds,
        "tokenizer_sha256": tokenizer_sha256(path),
        "path": str(path),
    }
    mlflow.log_metrics({k: float(summary[k]) for k in ("vocab_size", "bytes_per_token", "train_bytes",
                                                        "train_docs", "train_seconds")})
    mlflow.set_tags({TOKENIZER_TAG: summary["tokenizer_sha256"], "bytes_per_token_on": measured_on})
    for name in TOKENIZER_FILES:
        mlflow.log_artifact(str(out_dir / name), artifact_path="tokenizer")
    if tok.get_vocab_size() < tc.vocab_size:
        print(f"[tokenizer] note: the corpus gave only {tok.get_vocab_size()} tokens of the "
              f"{tc.vocab_size} asked for (tokenizer.vocab_size)")
    return summary
