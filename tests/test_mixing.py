"""Sources mixed by weight: token shares follow the weights; resume and rank count keep the order."""

from __future__ import annotations

import numpy as np
import pytest

from training.mixing import epochs_seen, mixed_samples, source_of


def test_token_shares_match_the_weights_within_two_percent_over_1000_batches() -> None:
    batch = 16  # micro_batch_size x world_size samples of block_size tokens each
    sources = source_of([0.7, 0.3], seed=1, start=0, count=1000 * batch)
    shares = np.bincount(sources, minlength=2) / len(sources)
    assert abs(shares[0] - 0.7) < 0.02 and abs(shares[1] - 0.3) < 0.02
    per_batch = sources.reshape(1000, batch).mean(axis=1)  # every stretch mixes, not one source then the other
    assert 0.1 < per_batch.mean() < 0.5 and per_batch.min() < per_batch.max()


def test_resume_and_rank_count_keep_the_same_order() -> None:
    samples, weights, seed = [5000, 40], [0.7, 0.3], 7
    whole = mixed_samples(samples, weights, seed, 0, 600)
    assert mixed_samples(samples, weights, seed, 0, 250) + mixed_samples(samples, weights, seed, 250, 350) == whole
    micro = 4
    for world in (1, 2, 3):  # rank r of `world` reads its own slice of each global batch, from its own start
        stream = []
        for step in range(600 // (micro * world)):
            for rank in range(world):
                stream += mixed_samples(samples, weights, seed, (step * world + rank) * micro, micro)
        assert stream == whole[: len(stream)]
    assert mixed_samples(samples, weights, seed + 1, 0, 600) != whole


def test_a_small_source_repeats_in_a_new_order_each_pass() -> None:
    samples, weights = [10_000, 20], [0.5, 0.5]
    drawn = [i for s, i in mixed_samples(samples, weights, 3, 0, 400) if s == 1]
    assert len(drawn) > 100
    first, second = drawn[:20], drawn[20:40]
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    seen = epochs_seen(samples, weights, 3, 400)
    assert seen[1] == pytest.approx(len(drawn) / 20)


def test_bad_weights_and_empty_sources_are_refused() -> None:
    with pytest.raises(ValueError, match="weights"):
        source_of([0.0, 0.0], 0, 0, 10)
    with pytest.raises(ValueError, match="no samples"):
        mixed_samples([0, 10], [0.5, 0.5], 0, 0, 10)


def test_a_cursor_that_skips_and_rewinds_gives_what_the_pure_function_gives() -> None:
    from training.mixing import MixCursor

    samples, weights, seed = [300, 7], [0.6, 0.4], 11
    cursor = MixCursor(samples, weights, seed)
    for start, count in ((0, 5), (5, 9), (30, 4), (200, 50), (12, 3), (2000, 8)):  # forward, gaps, back
        assert cursor.take(start, count) == mixed_samples(samples, weights, seed, start, count)
