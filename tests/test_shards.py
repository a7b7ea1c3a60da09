"""The token-shard format: what is written reads back, size bounds, metadata, the memory map, the split rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_shards_fixtures import random_documents, web_documents, write_token_shards

from dataprep.shard_step import split_of
from dataprep.shards import (
    ShardError,
    ShardWriter,
    build_manifest,
    manifest_sha256,
    open_shard,
    pack_documents,
    read_manifest,
    shard_metadata,
)


def decoded_documents(shards_dir: Path, manifest: dict, split: str) -> list[list[int]]:
    return [d.tolist() for s in manifest["splits"][split]["shards"]
            for d in open_shard(shards_dir / s["path"]).documents()]


def test_written_documents_read_back_with_eot_and_counts(tmp_path: Path) -> None:
    train, val = random_documents(200, seed=1), random_documents(20, seed=2)
    manifest = write_token_shards(tmp_path, {"train": train, "val": val}, max_shard_bytes=20_000)
    assert manifest == read_manifest(tmp_path)
    for split, docs in (("train", train), ("val", val)):
        assert decoded_documents(tmp_path, manifest, split) == [d.tolist() + [0] for d in docs]
        info = manifest["splits"][split]
        assert info["docs"] == len(docs) == sum(s["docs"] for s in info["shards"])
        assert info["tokens"] == sum(len(d) + 1 for d in docs) == sum(s["tokens"] for s in info["shards"])
        assert info["bytes"] == sum(2 * len(d) for d in docs)
        for s in info["shards"]:
            assert s["path"].startswith(f"{split}/") and len(s["sha256"]) == 64
    assert len(manifest["splits"]["train"]["shards"]) > 3  # size-bounded: many shards
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(manifest_sha256(tmp_path)) == 64


def test_shards_stay_under_the_size_bound(tmp_path: Path) -> None:
    docs = random_documents(300, seed=3, max_len=100)
    manifest = write_token_shards(tmp_path, {"train": docs}, max_shard_bytes=10_000, docs_per_batch=50)
    for s in manifest["splits"]["train"]["shards"]:
        payload = s["tokens"] * 2 + 8 * s["docs"]
        assert payload <= 10_000
        assert (tmp_path / s["path"]).stat().st_size < 10_000 + 4096  # Arrow framing adds little


def test_a_document_larger_than_a_shard_gets_its_own(tmp_path: Path) -> None:
    docs = [np.arange(1, 5000) % 999 + 1, np.arange(1, 10), np.arange(1, 8000) % 999 + 1]
    manifest = write_token_shards(tmp_path, {"train": docs}, max_shard_bytes=1000, docs_per_batch=3)
    assert [s["docs"] for s in manifest["splits"]["train"]["shards"]] == [1, 1, 1]
    assert decoded_documents(tmp_path, manifest, "train") == [d.tolist() + [0] for d in docs]


def test_schema_and_metadata_follow_the_contract(tmp_path: Path) -> None:
    manifest = write_token_shards(tmp_path, {"train": random_documents(5)}, vocab_size=1000, eot=0,
                                  tokenizer_hash="a" * 64)
    path = tmp_path / manifest["splits"]["train"]["shards"][0]["path"]
    schema = pa.ipc.open_file(pa.memory_map(str(path))).schema
    assert schema.field("input_ids").type == pa.large_list(pa.field("item", pa.uint16(), nullable=False))
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta == {"format": "scratchgpt-tokens", "version": "1", "tokenizer_sha256": "a" * 64,
                    "vocab_size": "1000", "eot_id": "0", "dtype": "uint16"}
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 1000


def test_vocabulary_over_16_bits_is_stored_as_uint32(tmp_path: Path) -> None:
    docs = [np.array([65535, 65536, 69999, 1]), np.array([70_000 - 1])]
    manifest = write_token_shards(tmp_path, {"train": docs}, vocab_size=70_000, eot=69_000)
    assert manifest["dtype"] == "uint32"
    assert decoded_documents(tmp_path, manifest, "train") == [[65535, 65536, 69999, 1, 69000], [69999, 69000]]


def test_uncompressed_shard_memory_maps_without_copying(tmp_path: Path) -> None:
    docs = random_documents(3000, seed=4, max_len=1000)  # about 3 MB of tokens
    manifest = write_token_shards(tmp_path, {"train": docs}, max_shard_bytes=64 << 20, docs_per_batch=500)
    path = tmp_path / manifest["splits"]["train"]["shards"][0]["path"]
    before = pa.total_allocated_bytes()
    view = open_shard(path)
    assert pa.total_allocated_bytes() - before < 100_000  # offsets at most, never the tokens
    mapping = view.mmap
    mapping.seek(0)
    base = mapping.read_buffer(1).address
    size = path.stat().st_size
    for chunk in view.chunks:
        assert base <= chunk.ctypes.data and chunk.ctypes.data + chunk.nbytes <= base + size
        assert not chunk.flags.owndata
    assert view.tokens == manifest["splits"]["train"]["tokens"] > 1_000_000


def test_zstd_shards_read_the_same_but_cost_the_memory_map(tmp_path: Path) -> None:
    docs = [np.full(5000, 7) for _ in range(50)]  # very compressible
    meta = shard_metadata("b" * 64, 1000, 0)
    entries = {}
    for compression, folder in (("none", tmp_path / "plain"), ("zstd", tmp_path / "zstd")):
        writer = ShardWriter(folder, "train", "t", meta, 1 << 30, compression)
        writer.write(pack_documents([d.tolist() for d in docs], [0] * len(docs), 0, "uint16"))
        entries[compression] = writer.close()[0]
    assert entries["zstd"]["file_bytes"] * 20 < entries["none"]["file_bytes"]
    plain = open_shard(tmp_path / "plain" / entries["none"]["path"])
    packed = open_shard(tmp_path / "zstd" / entries["zstd"]["path"])
    assert [d.tolist() for d in plain.documents()] == [d.tolist() for d in packed.documents()]
    packed.mmap.seek(0)
    base = packed.mmap.read_buffer(1).address
    size = (tmp_path / "zstd" / entries["zstd"]["path"]).stat().st_size
    assert not all(base <= c.ctypes.data < base + size for c in packed.chunks)  # decompressed into memory


def test_open_shard_refuses_files_that_are_not_shards(tmp_path: Path) -> None:
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow at all")
    with pytest.raises(ShardError, match="junk.arrow"):
        open_shard(junk)
    other = tmp_path / "other.arrow"
    with pa.ipc.new_file(str(other), pa.schema([("input_ids", pa.large_list(pa.uint16()))])) as w:
        w.write_table(pa.table({"input_ids": pa.array([[1, 2]], type=pa.large_list(pa.uint16()))}))
    with pytest.raises(ShardError, match="other.arrow is not a scratchgpt-tokens shard"):
        open_shard(other)
    with pytest.raises(ShardError, match="does not exist"):
        open_shard(tmp_path / "missing.arrow")


def test_manifest_is_sorted_and_reproducible() -> None:
    meta = shard_metadata("c" * 64, 500, 0)
    a = {"train": [{"path": "train/b.arrow", "sha256": "1", "docs": 1, "tokens": 2, "bytes": 3},
                   {"path": "train/a.arrow", "sha256": "2", "docs": 4, "tokens": 5, "bytes": 6}]}
    b = {"train": list(reversed(a["train"]))}
    assert build_manifest(meta, a) == build_manifest(meta, b)
    m = build_manifest(meta, a)
    assert [s["path"] for s in m["splits"]["train"]["shards"]] == ["train/a.arrow", "train/b.arrow"]
    assert m["splits"]["train"]["docs"] == 5 and m["splits"]["val"] == {"docs": 0, "tokens": 0, "bytes": 0,
                                                                           "shards": []}


def test_read_manifest_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no manifest.json in .*run `scratchgpt shard"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(ShardError, match="something-else"):
        read_manifest(tmp_path)


def test_split_depends_on_the_id_alone() -> None:
    ids = [d["id"] for d in web_documents()]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [split_of(i, 0.1) for i in ids]
    assert 0.05 < splits.count("val") / len(ids) < 0.15
    assert all(split_of(i, 0.0) == "train" for i in ids)
    grown = [split_of(i, 0.3) for i in ids]  # a larger fraction only moves documents into val
    assert all(g == "val" for s, g in zip(splits, grown, strict=True) if s == "val")
