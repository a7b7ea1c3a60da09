"""Generation: the KV cache changes speed, never the tokens; sampling filters; eos stop."""

from __future__ import annotations

import pytest
import torch

from training.model import GPT, GPTConfig
from training.sampling import filter_top_k, filter_top_p, sample_next


def model_for(position: str = "learned", block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, block_size=block_size, n_layer=2, n_head=2, n_embd=32, position=position)
    return GPT(cfg)


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=10, top_p=0.9, seed=3)],
    ids=["greedy", "sampled", "top-k-top-p"],
)
def test_cached_generation_equals_uncached(position, sampling):
    model = model_for(position)
    prompt = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(1))
    seed = sampling.pop("seed", 0)
    # 30 new tokens run past block_size 16, so the sliding window is covered too.
    cached = model.generate(prompt, 30, generator=torch.Generator().manual_seed(seed), use_cache=True, **sampling)
    plain = model.generate(prompt, 30, generator=torch.Generator().manual_seed(seed), use_cache=False, **sampling)
    assert cached.shape == (3, 35)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)


def test_same_seed_same_text_other_seed_other_text():
    model = model_for()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(5))
    c = model.generate(prompt, 20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stream_yields_what_generate_returns_and_restores_training_mode():
    model = model_for().train()
    prompt = torch.tensor([[4, 5]])
    steps = list(model.generate_stream(prompt, 8, temperature=0))
    assert all(s.shape == (1,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), model.generate(prompt, 8, temperature=0)[:, 2:])
    assert model.training


def test_generation_stops_at_eos():
    model = model_for()
    prompt = torch.tensor([[4, 5]])
    greedy = model.generate(prompt, 10, temperature=0)
    new = greedy[0, 2:].tolist()
    eos = new[2]  # the third generated token; it may have appeared earlier, so stop at its first occurrence
    first = new.index(eos)
    stopped = model.generate(prompt, 10, temperature=0, eos_id=eos)
    assert stopped[0].tolist() == [4, 5] + new[: first + 1]
    assert len(new) == 10 and first < 9


def test_finished_rows_pad_with_eos_until_all_finish():
    model = model_for()
    prompts = torch.tensor([[4, 5], [9, 1]])
    greedy = model.generate(prompts, 6, temperature=0)
    eos = int(greedy[0, 2])  # row 0 ends at once
    out = model.generate(prompts, 6, temperature=0, eos_id=eos)
    assert torch.all(out[0, 2:] == eos)
    row1 = greedy[1, 2:].tolist()
    expected = row1[: row1.index(eos) + 1] if eos in row1 else row1
    assert out[1, 2 : 2 + len(expected)].tolist() == expected


def test_bad_generation_arguments_are_named():
    model = model_for()
    prompt = torch.tensor([[1]])
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 3, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 3, top_p=1.5)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    # 0.5 alone is short of 0.7; with 0.25 it reaches 0.75, so two tokens stay.
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.1)).tolist() == [[False, True, True, True]]  # the best stays
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_top_p(shuffled, 0.7)).tolist() == [[True, False, True, False]]
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {0, 1}
    assert int(sample_next(logits, 0.0)) == 0
