"""The packed-sequence loader over Arrow token shards.

The documents of a split, in manifest order, form one token stream (each
document ends with the end-of-text id). Sample i is the `block_size + 1` tokens
starting at i * block_size; x is its first block_size tokens and y the last.

The order of samples is a pure function of (shards, seed, consumed samples):
epoch e visits the samples in the permutation drawn from (seed, e). Each call
takes the next `micro_batch_size * world_size` samples of that global order and
rank r keeps the r-th slice. So every rank computes its batch alone, a restore
needs only `consumed_samples`, and a restore with another number of ranks (same
global batch) continues with the very same samples.
"""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataprep.shards import SPLITS, ShardError, ShardView, file_sha256, open_shard, read_manifest


class LoaderError(ShardError):
    """Shards that do not fit the model or the tokenizer; the message says which."""


class PackedLoader:
    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        block_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        tokenizer_sha256: str | None = None,
        vocab_size: int | None = None,
        verify_checksums: bool = False,
        shuffle: bool = True,
        source: str | None = None,
    ):
        if split not in SPLITS:
            raise LoaderError(f"unknown split {split!r}: expected one of {SPLITS}")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside world_size {world_size}")
        if block_size < 1 or micro_batch_size < 1:
            raise LoaderError(f"block_size ({block_size}) and micro_batch_size ({micro_batch_size}) must be >= 1")
        self.shards_dir = Path(shards_dir)
        self.split = split
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = 0

        self.manifest = read_manifest(self.shards_dir)
        self._check_manifest(tokenizer_sha256, vocab_size)
        info = self.manifest["splits"][split]
        if source is not None:  # one source of data.sources: the stream of its shards alone
            info = source_split(self.manifest, split, source, self.shards_dir)
        self._split_tokens = int(info["tokens"])
        self._split_bytes = int(info["bytes"])
        self._data_id = hashlib.sha256("".join(s["sha256"] for s in info["shards"]).encode()).hexdigest()[:16]
        self._views: list[ShardView] = [self._open(entry, verify_checksums) for entry in info["shards"]]
        # The token stream: every record batch's buffer, back to back.
        self._chunks: list[np.ndarray] = [c for v in self._views for c in v.chunks if len(c)]
        self._starts = [0]
        for chunk in self._chunks:
            self._starts.append(self._starts[-1] + len(chunk))
        self.total_tokens = self._starts[-1]
        if self.total_tokens != self._split_tokens:
            raise LoaderError(f"{self.shards_dir}: the {split} shards hold {self.total_tokens} tokens but "
                              f"manifest.json says {self._split_tokens}; re-run `scratchgpt shard`")
        if self.total_tokens < block_size + 1:
            raise LoaderError(f"block_size {block_size} is longer than the {split} split of {self.shards_dir}"
                              f"{f' (source {source!r})' if source else ''}: "
                              f"it has {self.total_tokens} tokens, a sample needs block_size + 1 = {block_size + 1}")
        self._samples = (self.total_tokens - 1) // block_size
        self._perms: dict[int, np.ndarray] = {}

    # ---- checks ------------------------------------------------------------------------------------------------

    def _check_manifest(self, tokenizer_sha256: str | None, vocab_size: int | None) -> None:
        m, where = self.manifest, self.shards_dir / "manifest.json"
        if tokenizer_sha256 is not None and m["tokenizer_sha256"] != tokenizer_sha256:
            raise LoaderError(f"{where}: the shards were written with another tokenizer "
                              f"(sha256 {m['tokenizer_sha256'][:12]}…) than this one ({tokenizer_sha256[:12]}…); "
                              f"re-run `scratchgpt shard` with the current tokenizer")
        if vocab_size is not None and vocab_size < m["vocab_size"]:
            raise LoaderError(f"{where}: the model's vocab_size {vocab_size} is smaller than the tokenizer's "
                              f"{m['vocab_size']}, so some token ids would have no embedding")
        info = m["splits"].get(self.split)
        if not info or info.get("docs", 0) == 0 or not info.get("shards"):
            raise LoaderError(f"{where}: the {self.split} split is empty (no documents); "
                              f"raise shards.val_fraction or give data.val_inputs")

    def _open(self, entry: dict[str, Any], verify: bool) -> ShardView:
        path = self.shards_dir / entry["path"]
        if not path.is_file():
            raise LoaderError(f"{self.shards_dir / 'manifest.json'} lists {entry['path']}, but {path} is missing")
        if verify:
            actual = file_sha256(path)
            if actual != entry["sha256"]:
                raise LoaderError(f"checksum mismatch for {path}: manifest says sha256 {entry['sha256']}, "
                                  f"the file has {actual}")
        view = open_shard(path)
        meta, m = view.metadata, self.manifest
        if meta.get("tokenizer_sha256") != m["tokenizer_sha256"]:
            raise LoaderError(f"{path} was written with another tokenizer (sha256 {meta.get('tokenizer_sha256')}) "
                              f"than manifest.json says ({m['tokenizer_sha256']})")
        if meta.get("dtype") != m["dtype"] or int(meta.get("eot_id", -1)) != m["eot_id"]:
            raise LoaderError(f"{path}: dtype/eot_id {meta.get('dtype')}/{meta.get('eot_id')} differ from "
                              f"manifest.json's {m['dtype']}/{m['eot_id']}")
        if view.tokens != entry["tokens"]:
            raise LoaderError(f"{path} holds {view.tokens} tokens, manifest.json says {entry['tokens']}")
        return view

    # ---- order -------------------------------------------------------------------------------------------------

    @property
    def samples_per_epoch(self) -> int:
        return self._samples

    @property
    def tokens_per_sample_bytes(self) -> float:
        """UTF-8 bytes per token of this split: bits per byte = loss_nats / ln 2 / this."""
        return self._split_bytes / self._split_tokens

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self._samples

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self._samples)
            self._perms = {epoch: perm, **{e: p for e, p in self._perms.items() if e == epoch - 1}}
        return perm

    def sample_index(self, global_position: int) -> int:
        """Which sample sits at this position of the global order."""
        epoch, pos = divmod(global_position, self._samples)
        return int(self._permutation(epoch)[pos]) if self.shuffle else pos

    def _copy_tokens(self, start: int, out: np.ndarray) -> None:
        """out[:] = stream[start : start + len(out)], across record-batch boundaries."""
        c = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < len(out):
            chunk = self._chunks[c]
            offset = start + done - self._starts[c]
            take = min(len(out) - done, len(chunk) - offset)
            out[done : done + take] = chunk[offset : offset + take]
            done += take
            c += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: x, y of shape [micro_batch_size, block_size], y = x shifted by one."""
        first = self.consumed_samples + self.rank * self.micro_batch_size
        buf = np.empty((self.micro_batch_size, self.block_size + 1), dtype=np.int64)
        for row in range(self.micro_batch_size):
            self._copy_tokens(self.sample_index(first + row) * self.block_size, buf[row])
        self.consumed_samples += self.micro_batch_size * self.world_size
        tokens = torch.from_numpy(buf)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    # ---- checkpoint state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "split": self.split,
                "block_size": self.block_size, "shuffle": self.shuffle, "data_id": self._data_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved loader stopped; refuses a state from another stream or order."""
        for key, mine in (("split", self.split), ("block_size", self.block_size), ("seed", self.seed),
                          ("shuffle", self.shuffle), ("data_id", self._data_id)):
            if key in state and state[key] != mine:
                what = "the shards changed since" if key == "data_id" else f"{key} is {mine!r} now, but"
                raise LoaderError(f"cannot restore the {self.split} loader: {what} the saved state has "
                                  f"{key}={state[key]!r}; the sample order would not continue")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise LoaderError(f"consumed_samples {consumed} in the saved loader state is negative")
        self.consumed_samples = consumed


def source_split(manifest: dict[str, Any], split: str, source: str, shards_dir: Path) -> dict[str, Any]:
    """The manifest entry of one source's part of a split (shards tagged with it, in manifest order)."""
    shards = [e for e in manifest["splits"][split]["shards"] if e.get("source") == source]
    if not shards or not any(e["docs"] for e in shards):
        known = sorted(manifest.get("sources", {}))
        raise LoaderError(f"{shards_dir / 'manifest.json'}: source {source!r} has no {split} documents "
                          f"(sources in the manifest: {known}); re-run `scratchgpt shard` for data.sources")
    return {"docs": sum(e["docs"] for e in shards), "tokens": sum(e["tokens"] for e in shards),
            "bytes": sum(e["bytes"] for e in shards), "shards": shards}
