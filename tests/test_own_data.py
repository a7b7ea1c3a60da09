"""Your own text: a .txt file becomes documents a model can learn from, and both splits get some of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import SHARED, read_zst_jsonl

from dataprep.readers import InputReader, split_text
from pipeline.config import load_config
from pipeline.core.runner import run_stage

SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"


def test_paragraphs_are_packed_up_to_max_chars_and_ids_name_the_first_line() -> None:
    text = "a1\na2\n\n\nb1\nb2\n\nc1"
    assert split_text(text, 100) == [("1", text)]  # short: one document, the text as it is
    assert split_text(text, 6) == [("1", "a1\na2"), ("5", "b1\nb2"), ("8", "c1")]
    assert split_text(text, 13) == [("1", "a1\na2\n\n\nb1\nb2"), ("8", "c1")]  # blank lines between kept


def test_text_without_blank_lines_is_cut_at_line_ends_and_long_lines_at_max_chars() -> None:
    assert split_text("aaaa\nbbbb\ncccc", 9) == [("1", "aaaa\nbbbb"), ("3", "cccc")]
    assert split_text("x" * 12 + "\nyy", 5) == [("1", "xxxxx"), ("1@5", "xxxxx"), ("1@10", "xx\nyy")]


def test_every_character_of_tiny_shakespeare_lands_in_one_document() -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    docs = split_text(text, 20_000)
    assert 50 <= len(docs) <= 70 and max(len(d) for _, d in docs) <= 20_000
    rebuilt = "".join(d for _, d in docs)
    assert rebuilt.replace("\n", "") == text.replace("\n", "")  # only the blank lines between documents go
    assert len({s for s, _ in docs}) == len(docs)


def test_reader_splits_txt_with_stable_ids_or_keeps_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("first para\nstill first\n\nsecond para\n")
    reader = InputReader([str(path)], txt_split="paragraphs", txt_max_chars=25)
    assert [(d.id, d.text) for d in reader.run(None, 0, 1)] == [
        (f"{path}:1", "first para\nstill first"), (f"{path}:4", "second para")]
    whole = InputReader([str(path)], txt_split="file")
    assert [d.id for d in whole.run(None, 0, 1)] == [str(path)]
    cfg = load_config(None, ["data.txt.split=file", "data.txt.max_chars=5000"])
    assert (cfg.data.txt.split, cfg.data.txt.max_chars) == ("file", 5000)


def test_length_filter_names_a_whole_file_it_drops() -> None:
    from datatrove.data import Document

    from dataprep.filters import LengthFilter

    doc = Document(text="x" * 50, id="/data/book.txt", metadata={"file_path": "/data/book.txt"})
    keep, reason = LengthFilter(1, 10).filter(doc)
    assert not keep and "the whole file /data/book.txt" in reason and "data.txt.split" in reason


def _prep_docs(workdir: Path, texts: list[str], ids: list[str]) -> None:
    import zstandard

    out = workdir / "prep" / "output"
    out.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"text": t, "id": i, "metadata": {}}) + "\n" for i, t in zip(ids, texts, strict=True))
    (out / "00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))


def _shard(workdir: Path, texts: list[str], ids: list[str], *overrides: str) -> dict:
    from train_helpers import tiny_config

    from dataprep.shards import read_manifest

    _prep_docs(workdir, texts, ids)
    cfg = tiny_config(workdir, *overrides)
    run_stage(cfg, "tokenizer")
    summary = run_stage(cfg, "shard")
    summary["manifest"] = read_manifest(workdir / "shards")
    return summary


def _ids_all_in_train(n: int, val_fraction: float) -> list[str]:
    from dataprep.shard_step import split_of

    return [f"doc/{i}" for i in range(500) if split_of(f"doc/{i}", val_fraction) == "train"][:n]


@pytest.mark.parametrize("case", ["few documents", "one document"])
def test_both_splits_get_documents_when_the_hash_leaves_val_empty(tmp_path: Path, case: str) -> None:
    from dataprep.shards import open_shard

    play = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    n = 1 if case == "one document" else 21
    texts = [play] if n == 1 else [play[i * 2000:(i + 1) * 2000] for i in range(n)]
    ids = _ids_all_in_train(n, 0.2)  # every id hashes to train: the hash split alone leaves val empty
    summary = _shard(tmp_path, texts, ids, "shards.val_fraction=0.2")
    splits = summary["manifest"]["splits"]
    assert splits["train"]["docs"] >= 1 and splits["val"]["docs"] >= 1
    assert splits["train"]["tokens"] > 0 and splits["val"]["tokens"] > 0
    assert "went to val" in summary["split"]
    total_bytes = len("".join(texts).encode())
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == total_bytes  # bytes stay exact for bits per byte
    for split in ("train", "val"):  # the manifest lists what is on disk, with the right counts
        shards = splits[split]["shards"]
        assert sum(open_shard(tmp_path / "shards" / s["path"]).docs for s in shards) == splits[split]["docs"]
        assert sum(open_shard(tmp_path / "shards" / s["path"]).tokens for s in shards) == splits[split]["tokens"]


@pytest.mark.slow
def test_tiny_shakespeare_alone_gives_train_and_val(tmp_path: Path) -> None:
    """A nanoGPT user's first input: one input.txt, no other data key, through prep -> tokenizer -> shard."""

    cfg = load_config(None, [f"workdir={tmp_path}", f"data.inputs=[{SHAKESPEARE}]", "tokenizer.vocab_size=400",
                             "prep.tasks=1", "prep.workers=1", "shards.tasks=1", "shards.workers=1"])
    prep = run_stage(cfg, "prep")
    assert prep["docs_in"] >= 50 and prep["docs_out"] >= 10
    assert all(r["id"].startswith(f"{SHAKESPEARE}:") for r in read_zst_jsonl(tmp_path / "prep" / "output"))
    stats = json.loads((tmp_path / "prep" / "stats.json").read_text())
    assert stats["bytes_edited_c4_quality"] > 0  # C4 deletes lines of the play: counted, and warned about
    assert any("c4_quality" in w and "prep.filters.c4_quality" in w for w in prep["warnings"])
    run_stage(cfg, "tokenizer")
    shard = run_stage(cfg, "shard")
    assert shard["train_docs"] >= 1 and shard["val_docs"] >= 1 and shard["split"]
