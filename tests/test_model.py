"""The GPT model: config checks, GPT-2 layout and initialisation, loss, causality, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.config import ModelConfig
from training.model import GPT, GPTConfig, KVCache, sinusoidal_table


def tiny(position: str = "learned", **kw) -> GPTConfig:
    base = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, position=position)
    base.update(kw)
    return GPTConfig(**base)


def test_config_refuses_heads_that_do_not_divide_width():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=30)


def test_config_refuses_unknown_position_and_keys():
    with pytest.raises(ValueError, match="position"):
        tiny(position="rotary")
    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['n_ctx'\]"):
        GPTConfig.from_dict({**tiny().to_dict(), "n_ctx": 4})


def test_config_round_trips_and_comes_from_model_section():
    cfg = tiny("sinusoidal", dropout=0.1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    section = ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=32, position="sinusoidal")
    built = GPTConfig.from_model_config(section, vocab_size=500)
    assert (built.vocab_size, built.n_layer, built.block_size, built.position) == (500, 3, 32, "sinusoidal")
    assert GPTConfig.from_model_config(section.model_copy(update={"vocab_size": 512}), 500).vocab_size == 512
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        GPTConfig.from_model_config(section.model_copy(update={"vocab_size": 100}), 500)


def test_parameter_names_follow_gpt2_and_head_is_tied():
    model = GPT(tiny())
    names = set(model.state_dict())
    for name in ["wte.weight", "wpe.weight", "h.1.ln_1.weight", "h.1.ln_1.bias", "h.0.attn.c_attn.weight",
                 "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight", "h.0.ln_2.bias", "h.0.mlp.c_fc.weight",
                 "h.0.mlp.c_proj.bias", "ln_f.weight", "ln_f.bias"]:
        assert name in names, name
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.bias is None
    assert model.h[0].ln_1.eps == 1e-5


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.h[3].mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert model.h[3].attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.all(model.h[0].attn.c_attn.bias == 0)
    assert torch.all(model.ln_f.weight == 1)


def test_sinusoidal_table_is_a_fixed_buffer():
    model = GPT(tiny("sinusoidal", n_embd=6, n_head=2))
    table = model.wpe.weight
    assert "wpe.weight" in model.state_dict()
    assert all(p is not table for p in model.parameters())
    # "Attention is all you need": PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same angle).
    pos, i, d = 5, 1, 6
    angle = pos / 10000 ** (2 * i / d)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoidal_table(4, 5).shape == (4, 5)  # odd widths work too


def test_loss_is_mean_cross_entropy_and_ignores_minus_100():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 97, (2, 10))
    y = torch.randint(0, 97, (2, 10))
    y[0, :4] = -100
    logits, loss = model(x, y)
    assert logits.shape == (2, 10, 97)
    keep = y != -100
    expected = F.cross_entropy(logits[keep], y[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert model(x)[1] is None
    # An untrained model predicts roughly uniformly: loss near ln(V).
    assert loss.item() == pytest.approx(math.log(97), rel=0.1)


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_attention_is_causal(position):
    torch.manual_seed(0)
    model = GPT(tiny(position))
    x = torch.randint(0, 97, (1, 12))
    changed = x.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    a, _ = model(x)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_too_long_input_is_refused_clearly():
    model = GPT(tiny())
    with pytest.raises(ValueError, match=r"17 tokens is longer than the model's block_size \(16\)"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_backward_reaches_every_parameter_and_not_the_fixed_table():
    torch.manual_seed(0)
    model = GPT(tiny("sinusoidal"))
    x = torch.randint(0, 97, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not model.wpe.weight.requires_grad


def test_hidden_states_are_what_the_head_reads():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 97, (2, 7))
    hidden = model.hidden_states(x)
    assert hidden.shape == (2, 7, 32)
    torch.testing.assert_close(hidden @ model.wte.weight.T, model(x)[0])


def test_parameter_count_and_flops():
    cfg = tiny()
    model = GPT(cfg)
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    total = V * C + T * C + L * per_block + 2 * C
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C
    assert GPT(tiny("sinusoidal")).num_params() == total - T * C  # the table is no parameter at all
    assert model.flops_per_token() == 6 * (total - T * C) + 12 * L * C * T


def test_cache_prefilled_in_chunks_matches_full_forward():
    """Chunks after cached tokens need an explicit causal mask; check it against one full pass."""
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 97, (2, 11))
    cache = KVCache(model.config.n_layer, 16)
    parts = [model._hidden(x[:, :4], cache), model._hidden(x[:, 4:5], cache), model._hidden(x[:, 5:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), model.hidden_states(x), rtol=1e-5, atol=1e-5)
    assert cache.length == 11
    with pytest.raises(ValueError, match="block_size"):
        model._hidden(x[:, :6], cache)
