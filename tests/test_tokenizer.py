"""The byte-level BPE: exact round trip for any UTF-8, the end-of-text token, and loading with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_shards_fixtures import BUILT_STRINGS, all_shared_texts, web_documents

from dataprep.tokenizer import (
    EOT_TOKEN,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    split_pieces,
    text_encoder,
    tokenizer_sha256,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = web_documents()
    texts = [d["text"] for d in docs[:200]]  # about 1 MB of English web text
    tok = train_tokenizer(texts, vocab_size=1024)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out


def test_vocab_size_and_end_of_text_token(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.get_vocab_size() == 1024
    assert tok.id_to_token(eot_id(tok)) == EOT_TOKEN
    byte_tokens = [t for t in tok.get_vocab() if len(t) == 1]
    assert len(byte_tokens) == 256  # every byte is a token, seen in training or not


def test_round_trip_is_exact_for_all_shared_data(tok_dir: Path) -> None:
    tok = text_encoder(load_tokenizer(tok_dir))
    texts = all_shared_texts()
    assert sum(len(t) for t in texts) > 10_000_000  # the whole shared data, not a sample of it
    bad = []
    for start in range(0, len(texts), 64):
        batch = texts[start : start + 64]
        decoded = tok.decode_batch([e.ids for e in tok.encode_batch_fast(batch)], skip_special_tokens=False)
        bad += [t[:60] for t, d in zip(batch, decoded, strict=True) if t != d]
    assert bad == []


def test_round_trip_of_text_the_tokenizer_never_saw(tmp_path: Path) -> None:
    tok = train_tokenizer(["plain ascii words only, again and again. " * 50], vocab_size=300)
    tok = text_encoder(tok)
    for text in BUILT_STRINGS:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_end_of_text_written_inside_a_document_stays_text(tok_dir: Path) -> None:
    tok = text_encoder(load_tokenizer(tok_dir))
    text = "before <|endoftext|> after"
    ids = tok.encode(text).ids
    assert eot_id(tok) not in ids
    assert tok.decode(ids) == text


def test_transformers_autotokenizer_loads_the_folder(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = load_tokenizer(tok_dir)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf.eos_token == EOT_TOKEN and hf.bos_token == EOT_TOKEN
    assert hf.eos_token_id == eot_id(tok)
    assert len(hf) == tok.get_vocab_size()
    for text in [*BUILT_STRINGS[:5], " leading space", "trailing  . , ! cleanup bait ."]:
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text).ids
        assert hf.decode(ids) == text
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        assert (tok_dir / name).is_file()


def test_sha256_is_of_the_file_bytes(tok_dir: Path) -> None:
    import hashlib

    path = tok_dir / "tokenizer.json"
    assert tokenizer_sha256(tok_dir) == tokenizer_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_tokenizer_names_the_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_tokenizer(tmp_path / "nowhere")


def test_split_pieces_cuts_at_line_ends_and_loses_nothing() -> None:
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(2000)) + "x" * 10_000
    pieces = list(split_pieces(text, 1000))
    assert "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces if "x" not in p)
    assert [len(p) for p in pieces if p.startswith("x")] == [1000] * 10  # an unbroken run is cut hard
    assert max(len(p) for p in pieces) <= 1000
