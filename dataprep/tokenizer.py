"""Byte-level BPE: training, saving in a form `transformers.AutoTokenizer` loads, and the helpers the shards use.

The tokenizer is GPT-2's design: text is split with GPT-2's regex, every byte is
mapped to one of 256 visible characters, and merges are learned over those. So
any UTF-8 text (Chinese, emoji, code) encodes, and decoding gives back the exact
bytes. There is no normaliser: normalising would break the exact round trip.

One special token, the end-of-text token, separates documents in the token stream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# Pieces fed to the trainer: documents are cut at line ends into pieces of about this
# many characters, so the Rust trainer parallelises over them and a single huge
# document (a whole book) still leaves some pieces to hold back.
TRAIN_PIECE_CHARS = 4096


def new_bpe(eot_token: str = EOT_TOKEN) -> Any:
    """An untrained GPT-2 style byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Only adjusts offsets; no tokens are added, so encode(text) is exactly the text's tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    eot_token: str = EOT_TOKEN,
    length: int | None = None,
) -> Any:
    """Learn merges from `texts` until the vocabulary (256 bytes + the end-of-text token + merges) has `vocab_size`.

    A small corpus may stop short of `vocab_size`: the real size is `tok.get_vocab_size()`.
    """
    from tokenizers import pre_tokenizers, trainers

    tok = new_bpe(eot_token)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eot_token],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save_tokenizer(tok: Any, out_dir: str | Path, eot_token: str = EOT_TOKEN) -> Path:
    """Write tokenizer.json plus the GPT-2 files (vocab.json, merges.txt, configs) that transformers loads.

    Returns the path of tokenizer.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tmp = path.with_suffix(".json.tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    tok.model.save(str(out))  # vocab.json and merges.txt, for GPT-2 loaders that do not read tokenizer.json
    special = {"bos_token": eot_token, "eos_token": eot_token, "unk_token": eot_token}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_prefix_space": False,
        "add_bos_token": False,
        # transformers' default cleanup rewrites " ." to "." on decode; that would break the round trip.
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return path


def tokenizer_path(tokenizer_dir_or_file: str | Path) -> Path:
    path = Path(tokenizer_dir_or_file)
    return path / TOKENIZER_FILE if path.is_dir() else path


def load_tokenizer(tokenizer_dir: str | Path) -> Any:
    """The tokenizer saved in `tokenizer_dir` (or a tokenizer.json path)."""
    from tokenizers import Tokenizer

    path = tokenizer_path(tokenizer_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: run `scratchgpt tokenizer CONFIG` first")
    return Tokenizer.from_file(str(path))


def text_encoder(tok: Any) -> Any:
    """The tokenizer set to read special-token strings inside documents as plain text.

    A document that happens to contain "<|endoftext|>" then keeps its characters
    instead of injecting a document boundary, and decoding gives the text back.
    """
    tok.encode_special_tokens = True
    return tok


def eot_id(tok: Any, eot_token: str = EOT_TOKEN) -> int:
    token_id = tok.token_to_id(eot_token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no end-of-text token {eot_token!r}")
    return token_id


def tokenizer_sha256(path_to_tokenizer_json: str | Path) -> str:
    """sha256 of tokenizer.json's bytes: the identity the shards and the trainer check against."""
    return hashlib.sha256(tokenizer_path(path_to_tokenizer_json).read_bytes()).hexdigest()


def bytes_per_token(tok: Any, texts: list[str], batch: int = 256) -> float:
    """UTF-8 bytes per token over `texts` (higher is a better compression)."""
    n_bytes = n_tokens = 0
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
        n_tokens += sum(len(e.ids) for e in tok.encode_batch_fast(chunk))
    if n_tokens == 0:
        raise ValueError("no text to measure bytes per token on")
    return n_bytes / n_tokens


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) from a string: the same on every machine, task and run."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def split_pieces(text: str, piece_chars: int = TRAIN_PIECE_CHARS) -> Iterator[str]:
    """Cut text into pieces of about `piece_chars`, at a line end where there is one."""
    start = 0
    while start < len(text):
        end = start + piece_chars
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end
