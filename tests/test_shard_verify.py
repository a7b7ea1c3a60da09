"""Shards are verified before pretraining trusts them: damaged bytes, an edited manifest, ids outside the
vocabulary and a too-small model vocabulary stop with a ShardError naming the shard; the hash cache spares a
restart from hashing unchanged files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_shards_fixtures import random_documents, write_token_shards
from train_helpers import build_workdir, copy_inputs, tiny_config

from dataprep.shard_verify import CACHE, verify_shards
from dataprep.shards import ShardError


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    write_token_shards(tmp_path, {"train": random_documents(120, seed=1), "val": random_documents(20, seed=2)},
                       max_shard_bytes=20_000)
    return tmp_path


def first_shard(shards_dir: Path) -> Path:
    return shards_dir / json.loads((shards_dir / "manifest.json").read_text())["splits"]["train"]["shards"][0]["path"]


def flip_a_token_byte(path: Path) -> None:
    """Change one byte in the middle of the token data; the size stays the same."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))


def test_clean_shards_pass_and_a_restart_hashes_nothing(shards: Path) -> None:
    first = verify_shards(shards, "full", vocab_size=1000)
    assert first.shards >= 3 and first.hashed == first.shards and first.max_id <= 999
    assert (shards / CACHE).is_file()
    again = verify_shards(shards, "full", vocab_size=1000)
    assert again.hashed == 0 and again.shards == first.shards
    touched = first_shard(shards)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert verify_shards(shards, "full", vocab_size=1000).hashed == 1  # only the file whose mtime moved


def test_flipped_bytes_of_the_same_size_are_found(shards: Path) -> None:
    verify_shards(shards, "full")  # cache the good hashes first, as a first run would
    path = first_shard(shards)
    size = path.stat().st_size
    flip_a_token_byte(path)
    assert path.stat().st_size == size
    assert verify_shards(shards, "fast").shards > 0  # fast checks sizes and metadata: it cannot see this
    with pytest.raises(ShardError, match="manifest says sha256 [0-9a-f]{64}, the file has [0-9a-f]{64}") as err:
        verify_shards(shards, "full")
    assert str(path) in str(err.value)


def test_a_hand_edited_manifest_sha256_is_refused(shards: Path) -> None:
    verify_shards(shards, "full")
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"manifest says sha256 {'0' * 64}, the file has") as err:
        verify_shards(shards, "full")  # the cache holds what the file hashes to, not what the manifest claims
    assert manifest["splits"]["val"]["shards"][0]["path"] in str(err.value)


def test_an_id_outside_the_vocabulary_is_refused(tmp_path: Path) -> None:
    docs = random_documents(30, seed=3)
    docs[7] = np.concatenate([docs[7], [1500]])  # the manifest says vocab 1000; the shard's hash is right
    write_token_shards(tmp_path, {"train": docs, "val": random_documents(5, seed=4)})
    with pytest.raises(ShardError, match=r"holds token id 1500, outside the model's vocabulary of 1000 ids"):
        verify_shards(tmp_path, "full")


def test_schema_metadata_must_match_the_manifest(shards: Path) -> None:
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["eot_id"] = 5
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"schema metadata eot_id is '0', the manifest says '5'"):
        verify_shards(shards, "fast")


def test_a_truncated_shard_is_named_in_fast_mode(shards: Path) -> None:
    path = first_shard(shards)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 100])
    with pytest.raises(ShardError, match=f"manifest says {size} bytes, the file has {size - 100}"):
        verify_shards(shards, "fast")
    assert verify_shards(shards, "off").shards == 0


# ---- through the pretrain stage's start-up


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("verify-base")
    build_workdir(workdir)
    return workdir


def test_pretrain_start_up_refuses_a_damaged_shard_before_training(base: Path, tmp_path: Path) -> None:
    from pipeline.stages.pretrain import build

    workdir = tmp_path / "damaged"
    copy_inputs(base, workdir)
    flip_a_token_byte(first_shard(workdir / "shards"))
    with pytest.raises(ShardError, match="is damaged or was changed"):
        build(tiny_config(workdir))
    assert not (workdir / "pretrain" / "checkpoints").exists()  # nothing trained on it
    build(tiny_config(workdir, "shards.verify=off"))  # the user's way out for a known case


def test_a_smaller_model_vocabulary_is_a_shard_error_not_an_index_error(base: Path, tmp_path: Path) -> None:
    from pipeline.stages.pretrain import build

    workdir = tmp_path / "small-vocab"
    copy_inputs(base, workdir)
    with pytest.raises(ShardError, match="vocabulary of 300 ids, but model.vocab_size is 280"):
        build(tiny_config(workdir, "model.vocab_size=280"))
