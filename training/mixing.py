"""Several sources mixed by weight: which source each global sample comes from, as a pure function.

A building block for `data.sources` (not wired into the loader yet). Global sample *i*
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


def draws_before(weights: Sequence[float], seed: int, consumed: int, chunk: int = 1 << 22) -> np.ndarray:
    """How many of the first `consumed` global samples each source gave (where a resume continues)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    for start in range(0, consumed, chunk):
        counts += np.bincount(source_of(weights, seed, start, min(chunk, consumed - start)), minlength=len(weights))
    return counts


def mixed_samples(samples: Sequence[int], weights: Sequence[float], seed: int, start: int,
                  count: int) -> list[tuple[int, int]]:
    """(source, sample within that source) for global samples start .. start+count-1.

    `samples[s]` is how many samples source *s* holds; its *k*-th draw is element *k mod n*
    of a permutation of range(n) drawn from (seed, s, epoch k // n).
    """
    if any(n <= 0 for n, w in zip(samples, weights, strict=True) if w > 0):
        raise ValueError(f"a source with weight > 0 has no samples: samples {list(samples)}, weights {list(weights)}")
    sources = source_of(weights, seed, start, count)
    seen = draws_before(weights, seed, start)
    perms: dict[tuple[int, int], np.ndarray] = {}
    out = []
    for s in sources.tolist():
        k = int(seen[s])
        seen[s] += 1
        n = samples[s]
        epoch = k // n
        if (s, epoch) not in perms:
            perms[(s, epoch)] = np.random.default_rng([seed, s, epoch]).permutation(n)
        out.append((s, int(perms[(s, epoch)][k % n])))
    return out


def epochs_seen(samples: Sequence[int], weights: Sequence[float], seed: int, consumed: int) -> list[float]:
    """Passes over each source after `consumed` global samples (for the summary)."""
    return [int(c) / n if n else 0.0 for c, n in zip(draws_before(weights, seed, consumed), samples, strict=True)]
