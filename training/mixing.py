"""Several sources mixed by weight: which source each global sample comes from, as a pure function.

The order behind `data.sources` (training.mixed_loader reads it). Global sample *i*
(counting every sample every rank consumed, as `consumed_samples` in a checkpoint does)
is drawn from source *s* with probability `weights[s]` by a hash of (seed, i), so:

- the order depends only on (sample counts, weights, seed, consumed samples): a resume
  needs `consumed_samples` alone, and any number of ranks sees the same global order
  (rank *r* takes its slice of each global batch, as `PackedLoader` does);
- samples are `block_size` tokens each, so shares of samples are shares of tokens;
- a source's *k*-th draw is sample *k mod n* of its own permutation for epoch *k // n*
  (a small source repeats, each pass in a new order); `epochs_seen` says how often.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per index, from a splitmix64 hash of (seed, index)."""
    with np.errstate(over="ignore"):
        z = (index.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def source_of(weights: Sequence[float], seed: int, start: int, count: int) -> np.ndarray:
    """The source index of global samples start .. start+count-1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"source weights must be non-negative with a positive sum, got {list(weights)}")
    edges = np.cumsum(w / w.sum())
    edges[-1] = 1.0
    return np.searchsorted(edges, _uniform(seed, np.arange(start, start + count)), side="right")


def draws_before(weights: Sequence[float], seed: int, consumed: int, chunk: int = 1 << 22,
                 since: int = 0) -> np.ndarray:
    """How many of the first `consumed` global samples each source gave (where a resume continues);
    with `since`, of the samples since .. consumed-1 only."""
    counts = np.zeros(len(weights), dtype=np.int64)
    for start in range(since, consumed, chunk):
        counts += np.bincount(source_of(weights, seed, start, min(chunk, consumed - start)), minlength=len(weights))
    return counts


def mixed_samples(samples: Sequence[int], weights: Sequence[float], seed: int, start: int,
                  count: int) -> list[tuple[int, int]]:
    """(source, sample within that source) for global samples start .. start+count-1.

    `samples[s]` is how many samples source *s* holds; its *k*-th draw is element *k mod n*
    of a permutation of range(n) drawn from (seed, s, epoch k // n).
    """
    return MixCursor(samples, weights, seed).take(start, count)


class MixCursor:
    """`mixed_samples` for a reader that moves forward (a loader): the draw counts travel with it instead of
    being recounted from sample 0 at every call, so a step costs its own samples, not the whole run's."""

    def __init__(self, samples: Sequence[int], weights: Sequence[float], seed: int) -> None:
        if any(n <= 0 for n, w in zip(samples, weights, strict=True) if w > 0):
            raise ValueError(f"a source with weight > 0 has no samples: samples {list(samples)}, "
                             f"weights {list(weights)}")
        self.samples, self.weights, self.seed = list(samples), list(weights), seed
        self._position = 0
        self._seen = np.zeros(len(self.samples), dtype=np.int64)  # draws of each source before _position
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)

    def _seek(self, start: int) -> None:
        if start < self._position:  # backwards (a restore): count from the beginning
            self._position, self._seen = 0, np.zeros_like(self._seen)
        # the other ranks' slices in between, or everything before a restored position
        self._seen = self._seen + draws_before(self.weights, self.seed, start, since=self._position)
        self._position = start

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        held = self._perms.get(source)
        if held is None or held[0] != epoch:
            held = (epoch, np.random.default_rng([self.seed, source, epoch]).permutation(self.samples[source]))
            self._perms[source] = held
        return held[1]

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        """(source, sample within that source) for global samples start .. start+count-1."""
        self._seek(start)
        out = []
        for s in source_of(self.weights, self.seed, start, count).tolist():
            k = int(self._seen[s])
            self._seen[s] += 1
            n = self.samples[s]
            out.append((s, int(self._permutation(s, k // n)[k % n])))
        self._position = start + count
        return out


def epochs_seen(samples: Sequence[int], weights: Sequence[float], seed: int, consumed: int) -> list[float]:
    """Passes over each source after `consumed` global samples (for the summary)."""
    return [int(c) / n if n else 0.0 for c, n in zip(draws_before(weights, seed, consumed), samples, strict=True)]
