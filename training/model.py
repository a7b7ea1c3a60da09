"""GPT-2, written here: pre-LN transformer blocks, causal SDPA attention, GELU (tanh) MLP, tied output head.

Parameter names follow GPT-2's layout (wte, wpe, h.{i}.ln_1, attn.c_attn, ...) so that export to
`transformers.GPT2LMHeadModel` is a rename plus the Conv1D transposes (see training/export.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from training.sampling import check_sampling_args, sample_next

if TYPE_CHECKING:
    from training.config import ModelConfig

POSITION_KINDS = ("learned", "sinusoidal")
LAYER_NORM_EPS = 1e-5  # GPT-2's layer_norm_epsilon
INIT_STD = 0.02  # GPT-2's initializer_range


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    position: str = "learned"  # or "sinusoidal": the fixed sin/cos table, a buffer, not trained
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.position not in POSITION_KINDS:
            raise ValueError(f"GPTConfig.position must be one of {POSITION_KINDS}, got {self.position!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_model_config(cls, model_cfg: ModelConfig, vocab_size: int) -> GPTConfig:
        """The model section of the config, with `vocab_size` (the tokenizer's) unless the config sets one."""
        vocab = model_cfg.vocab_size if model_cfg.vocab_size is not None else vocab_size
        if vocab < vocab_size:
            raise ValueError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary ({vocab_size})")
        return cls(
            vocab_size=vocab,
            block_size=model_cfg.block_size,
            n_layer=model_cfg.n_layer,
            n_head=model_cfg.n_head,
            n_embd=model_cfg.n_embd,
            position=model_cfg.position,
            dropout=model_cfg.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed position encoding of "Attention is all you need": sin on even channels, cos on odd."""
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return table.float()


class SinusoidalPositions(nn.Module):
    """A non-trainable position table with the same call and state-dict key (`weight`) as nn.Embedding."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", sinusoidal_table(n_positions, dim))

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return F.embedding(pos, self.weight)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, in buffers allocated once.

    `length` is the number of cached positions, which is also the position of the next token.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] at positions length..length+T; return everything cached for this layer."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to reach {end}")
        if self.keys[layer] is None:  # allocate on first use, with the dtype autocast gave k and v
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        elif T == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # a chunk after cached tokens: SDPA's is_causal aligns top-left, so spell the mask out
            q_pos = torch.arange(offset, offset + T, device=x.device).unsqueeze(1)
            mask = torch.arange(offset + T, device=x.device).unsqueeze(0) <= q_pos
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.wpe: nn.Module = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.wpe = SinusoidalPositions(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).

        Public so a trainer that builds the model partitioned (ZeRO-3 `zero.Init`) can gather and rerun it.
        """
        resid_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith("c_proj") else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states [B, T, C] of idx, placed after the cached positions if a cache is given."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time] token ids, got shape {tuple(idx.shape)}")
        T = idx.size(1)
        offset = cache.length if cache is not None else 0
        if T == 0:
            raise ValueError("idx holds no tokens; give at least one")
        if offset + T > self.config.block_size:
            raise ValueError(
                f"sequence of {offset + T} tokens is longer than the model's block_size ({self.config.block_size})"
            )
        pos = torch.arange(offset, offset + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V]; with targets, also the mean cross-entropy (ignore_index=-100)."""
        logits = self.lm_head(self._hidden(idx))
        loss = None
        if targets is not None:
            # In float: a bf16 loss is too coarse to compare or log (7.1250, 7.1875, ...).
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T, C] after the final LayerNorm, for task heads."""
        return self._hidden(idx)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. As nanoGPT, non_embedding leaves out the position table only: the token
        embedding is also the output projection, so its matmul is real compute."""
        # ds_numel: under ZeRO-3 a partitioned parameter's own numel() is 0 on every rank.
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        if non_embedding and self.config.position == "learned":
            n -= getattr(self.wpe.weight, "ds_numel", self.wpe.weight.numel())
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token: 6N plus attention's 12 * L * C * T (PaLM, appendix B)."""
        cfg = self.config
        return 6.0 * self.num_params() + 12.0 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """idx [B, T] followed by up to max_new_tokens sampled ids (fewer if every row reached eos_id).

        `sampling` takes generate_stream's keywords (temperature, top_k, top_p, generator, use_cache, eos_id).
        """
        new = list(self.generate_stream(idx, max_new_tokens, **sampling))
        if not new:
            return idx
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        eos_id: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids [B] one step at a time.

        temperature 0 is greedy. A row that produced eos_id keeps yielding eos_id until every row has.
        Past block_size the context slides like the uncached path (the window's positions all shift, so
        the cache cannot be reused there and each step recomputes the window).
        """
        check_sampling_args(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"prompt must be [batch, time] with at least one token, got shape {tuple(idx.shape)}")
        block = self.config.block_size
        cache = KVCache(self.config.n_layer, min(block, idx.size(1) + max_new_tokens)) if use_cache else None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                if cache is not None and idx.size(1) <= block:
                    hidden = self._hidden(idx[:, cache.length :], cache)
                else:
                    hidden = self._hidden(idx[:, -block:])
                logits = self.lm_head(hidden[:, -1])
                token = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_id), token)
                    finished |= token == eos_id
                idx = torch.cat([idx, token.unsqueeze(1)], dim=1)
                yield token
                if eos_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
