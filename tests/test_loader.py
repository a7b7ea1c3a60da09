"""The packed loader: deterministic order, full coverage per epoch, exact resume across rank counts, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_shards_fixtures import random_documents, write_token_shards

from dataprep.shards import read_manifest
from training.data import LoaderError, PackedLoader

BLOCK = 16
HASH = "f" * 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    # random ids make every 16-token window unique, so a row tells which sample it is
    write_token_shards(folder, {"train": random_documents(120, seed=10, vocab_size=50_000),
                                "val": random_documents(12, seed=11, vocab_size=50_000)},
                       vocab_size=50_000, tokenizer_hash=HASH, max_shard_bytes=8_000)
    return folder


def stream(folder: Path, split: str) -> np.ndarray:
    from dataprep.shards import open_shard

    m = read_manifest(folder)
    return np.concatenate([c for s in m["splits"][split]["shards"] for c in open_shard(folder / s["path"]).chunks])


def batches(loader: PackedLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_batches_are_shifted_windows_of_the_token_stream(shards: Path) -> None:
    loader = PackedLoader(shards, "train", BLOCK, 4, seed=1)
    tokens = stream(shards, "train")
    assert len(read_manifest(shards)["splits"]["train"]["shards"]) > 2  # windows cross shard boundaries
    assert loader.samples_per_epoch == (len(tokens) - 1) // BLOCK
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, BLOCK) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in range(4):
        i = loader.sample_index(row)
        assert x[row].tolist() == tokens[i * BLOCK : i * BLOCK + BLOCK].tolist()
        assert y[row, -1].item() == tokens[i * BLOCK + BLOCK]


def test_same_seed_same_batches_other_seed_other_batches(shards: Path) -> None:
    a = batches(PackedLoader(shards, "train", BLOCK, 4, seed=1), 5)
    b = batches(PackedLoader(shards, "train", BLOCK, 4, seed=1), 5)
    c = batches(PackedLoader(shards, "train", BLOCK, 4, seed=2), 5)
    assert same(a, b)
    assert not same(a, c)


def test_every_sequence_once_per_epoch_and_a_new_order_next_epoch(shards: Path) -> None:
    loader = PackedLoader(shards, "train", BLOCK, 8, seed=3)
    tokens = stream(shards, "train")
    n = loader.samples_per_epoch
    index = {tuple(tokens[i * BLOCK : i * BLOCK + BLOCK].tolist()): i for i in range(n)}
    assert len(index) == n
    seen = [index[tuple(row.tolist())] for _ in range(-(-2 * n // 8)) for row in loader.next_batch()[0]]
    first, second = seen[:n], seen[n : 2 * n]
    assert sorted(first) == list(range(n))
    assert sorted(second) == list(range(n))
    assert first != second


def test_ranks_split_each_global_batch(shards: Path) -> None:
    whole = batches(PackedLoader(shards, "train", BLOCK, 12, seed=4), 6)
    for world in (2, 3, 4):
        ranks = [batches(PackedLoader(shards, "train", BLOCK, 12 // world, rank=r, world_size=world, seed=4), 6)
                 for r in range(world)]
        for step in range(6):
            assert torch.equal(torch.cat([ranks[r][step][0] for r in range(world)]), whole[step][0])


@pytest.mark.parametrize("world_after", [1, 2, 4])
def test_restore_mid_epoch_continues_exactly(shards: Path, world_after: int) -> None:
    reference = PackedLoader(shards, "train", BLOCK, 8, seed=5)
    expected = batches(reference, 160)
    assert 100 * 8 < reference.samples_per_epoch < 160 * 8  # restored mid-epoch, then across an epoch boundary

    first = PackedLoader(shards, "train", BLOCK, 4, rank=1, world_size=2, seed=5)
    batches(first, 100)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["consumed_samples"] == 800

    resumed = [PackedLoader(shards, "train", BLOCK, 8 // world_after, rank=r, world_size=world_after, seed=5)
               for r in range(world_after)]
    for loader in resumed:
        loader.load_state_dict(state)
    for step in range(100, 160):
        parts = [loader.next_batch() for loader in resumed]
        assert torch.equal(torch.cat([p[0] for p in parts]), expected[step][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), expected[step][1])


def test_restore_refuses_a_state_from_another_order(shards: Path) -> None:
    state = PackedLoader(shards, "train", BLOCK, 4, seed=6).state_dict()
    with pytest.raises(LoaderError, match="seed"):
        PackedLoader(shards, "train", BLOCK, 4, seed=7).load_state_dict(state)
    with pytest.raises(LoaderError, match="block_size"):
        PackedLoader(shards, "train", BLOCK * 2, 4, seed=6).load_state_dict(state)


def test_unshuffled_val_is_in_stream_order_and_wraps(shards: Path) -> None:
    loader = PackedLoader(shards, "val", BLOCK, 5, shuffle=False)
    tokens = stream(shards, "val")
    n = loader.samples_per_epoch
    rows = [row for _ in range(-(-(n + 3) // 5)) for row in loader.next_batch()[0]]
    assert [r.tolist() for r in rows[:n]] == [tokens[i * BLOCK : i * BLOCK + BLOCK].tolist() for i in range(n)]
    assert torch.equal(rows[n], rows[0])  # wraps around a small split


def test_bytes_per_token_comes_from_the_manifest(shards: Path) -> None:
    info = read_manifest(shards)["splits"]["val"]
    assert PackedLoader(shards, "val", BLOCK, 2).tokens_per_sample_bytes == info["bytes"] / info["tokens"]


def test_loader_maps_the_shards_without_copying_tokens(tmp_path: Path) -> None:
    write_token_shards(tmp_path, {"train": random_documents(2000, seed=12, max_len=2000)},
                       max_shard_bytes=1 << 30, docs_per_batch=400)
    tokens = read_manifest(tmp_path)["splits"]["train"]["tokens"]
    assert tokens * 2 > 3_000_000
    before = pa.total_allocated_bytes()
    loader = PackedLoader(tmp_path, "train", 256, 16)
    assert pa.total_allocated_bytes() - before < 100_000
    (view,) = loader._views
    view.mmap.seek(0)
    base, size = view.mmap.read_buffer(1).address, view.mmap.size()
    assert all(base <= c.ctypes.data and c.ctypes.data + c.nbytes <= base + size for c in loader._chunks)
    loader.next_batch()


# ---- refusals, each naming what is wrong ---------------------------------------------------------------------


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    write_token_shards(tmp_path, {"train": random_documents(40, seed=13), "val": random_documents(4, seed=14)},
                       vocab_size=1000, tokenizer_hash=HASH, max_shard_bytes=4000)
    return tmp_path


def test_checksum_mismatch_is_refused_when_verifying(small: Path) -> None:
    entry = read_manifest(small)["splits"]["train"]["shards"][1]
    path = small / entry["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside the token buffer: the file still opens
    path.write_bytes(bytes(data))
    PackedLoader(small, "train", BLOCK, 2)  # not verified: opens
    with pytest.raises(LoaderError, match=f"checksum mismatch for .*{entry['path']}"):
        PackedLoader(small, "train", BLOCK, 2, verify_checksums=True)


def test_shards_of_another_tokenizer_are_refused(small: Path) -> None:
    with pytest.raises(LoaderError, match="written with another tokenizer"):
        PackedLoader(small, "train", BLOCK, 2, tokenizer_sha256="0" * 64)
    PackedLoader(small, "train", BLOCK, 2, tokenizer_sha256=HASH)


def test_a_stray_shard_from_another_tokenizer_is_refused(small: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    write_token_shards(other, {"train": random_documents(40, seed=13)}, vocab_size=1000,
                       tokenizer_hash="e" * 64, max_shard_bytes=4000)
    manifest = read_manifest(small)
    entry = manifest["splits"]["train"]["shards"][0]
    stray = read_manifest(other)["splits"]["train"]["shards"][0]
    (small / entry["path"]).write_bytes((other / stray["path"]).read_bytes())
    entry.update(sha256=stray["sha256"], tokens=stray["tokens"])  # a hand-merged manifest that looks consistent
    (small / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match=f"{entry['path']} was written with another tokenizer"):
        PackedLoader(small, "train", BLOCK, 2, verify_checksums=True)


def test_missing_shard_file_is_named(small: Path) -> None:
    entry = read_manifest(small)["splits"]["train"]["shards"][-1]
    (small / entry["path"]).unlink()
    with pytest.raises(LoaderError, match=f"lists {entry['path']}, but .* is missing"):
        PackedLoader(small, "train", BLOCK, 2)


def test_model_vocab_smaller_than_the_tokenizer_is_refused(small: Path) -> None:
    with pytest.raises(LoaderError, match="vocab_size 999 is smaller than the tokenizer's 1000"):
        PackedLoader(small, "train", BLOCK, 2, vocab_size=999)
    PackedLoader(small, "train", BLOCK, 2, vocab_size=1024)  # padded embeddings are fine


def test_empty_split_is_refused(tmp_path: Path) -> None:
    write_token_shards(tmp_path, {"train": random_documents(10), "val": []})
    with pytest.raises(LoaderError, match="the val split is empty"):
        PackedLoader(tmp_path, "val", BLOCK, 2)


def test_block_size_longer_than_the_split_is_refused(small: Path) -> None:
    tokens = read_manifest(small)["splits"]["val"]["tokens"]
    PackedLoader(small, "val", tokens - 1, 1)  # exactly one sample fits
    with pytest.raises(LoaderError, match=f"block_size {tokens} is longer than the val split.*{tokens} tokens"):
        PackedLoader(small, "val", tokens, 1)


def test_missing_manifest_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(LoaderError.__mro__[1], match="scratchgpt shard"):
        PackedLoader(tmp_path, "train", BLOCK, 2)
