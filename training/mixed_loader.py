"""The pretraining loader for `data.sources`: each global sample drawn from a source at its weight.

Each source's shards form their own token stream (a `PackedLoader` restricted to that
source); `training.mixing` says which source global sample *i* comes from and which of
that source's samples it is. Samples are all `block_size` tokens, so the weights are
shares of tokens. The order is a pure function of (shards, weights, seed, consumed
samples): rank *r* takes the *r*-th slice of each global batch as `PackedLoader` does, so
a restore needs only `consumed_samples`, on any number of ranks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import LoaderError, PackedLoader
from training.mixing import MixCursor, epochs_seen


class MixedLoader:
    def __init__(self, shards_dir: str | Path, split: str, weights: dict[str, float], block_size: int,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 1337,
                 tokenizer_sha256: str | None = None, vocab_size: int | None = None,
                 verify_checksums: bool = False):
        if not weights:
            raise LoaderError("a mixed loader needs at least one source")
        self.names = list(weights)
        self.weights = [float(weights[n]) for n in self.names]
        self.split, self.block_size, self.seed = split, block_size, seed
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.streams = [PackedLoader(shards_dir, split, block_size, micro_batch_size, rank, world_size, seed,
                                     tokenizer_sha256, vocab_size, verify_checksums, shuffle=False, source=name)
                        for name in self.names]
        self.samples = [s.samples_per_epoch for s in self.streams]
        self._cursor = MixCursor(self.samples, self.weights, seed)
        self._data_id = hashlib.sha256("".join(s.state_dict()["data_id"] for s in self.streams).encode()
                                       ).hexdigest()[:16]
        self.consumed_samples = 0

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.samples)

    def picks(self, start: int, count: int) -> list[tuple[int, int]]:
        """(source index, sample within that source) of global samples start .. start+count-1."""
        return self._cursor.take(start, count)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: x, y of shape [micro_batch_size, block_size], y = x shifted by one."""
        first = self.consumed_samples + self.rank * self.micro_batch_size
        buf = np.empty((self.micro_batch_size, self.block_size + 1), dtype=np.int64)
        for row, (source, sample) in enumerate(self.picks(first, self.micro_batch_size)):
            self.streams[source]._copy_tokens(sample * self.block_size, buf[row])
        self.consumed_samples += self.micro_batch_size * self.world_size
        tokens = torch.from_numpy(buf)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def __iter__(self) -> MixedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def epochs_seen(self) -> dict[str, float]:
        """Passes over each source so far (a small source with a large weight repeats)."""
        seen = epochs_seen(self.samples, self.weights, self.seed, self.consumed_samples)
        return {name: round(e, 4) for name, e in zip(self.names, seen, strict=True)}

    # ---- checkpoint state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "split": self.split,
                "block_size": self.block_size, "sources": self.names, "weights": self.weights,
                "data_id": self._data_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved loader stopped; refuses a state from other shards, sources or weights."""
        for key, mine in (("split", self.split), ("block_size", self.block_size), ("seed", self.seed),
                          ("sources", self.names), ("weights", self.weights), ("data_id", self._data_id)):
            if state.get(key) != mine:
                what = "the shards changed since" if key == "data_id" else f"{key} is {mine!r} now, but"
                raise LoaderError(f"cannot restore the mixed {self.split} loader: {what} the saved state has "
                                  f"{key}={state.get(key)!r}; the sample order would not continue")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise LoaderError(f"consumed_samples {consumed} in the saved loader state is negative")
        self.consumed_samples = consumed


def source_val_loaders(shards_dir: str | Path, weights: dict[str, float], loader_args: dict[str, Any]
                       ) -> dict[str, tuple[Any, float, float]]:
    """name -> (a factory of that source's val loader, its UTF-8 bytes per token, its weight): Trainer.source_val."""
    out: dict[str, tuple[Any, float, float]] = {}
    for name, weight in weights.items():
        def make(name: str = name) -> PackedLoader:
            return PackedLoader(shards_dir, "val", shuffle=False, source=name, **loader_args)

        out[name] = (make, make().tokens_per_sample_bytes, weight)
    return out
