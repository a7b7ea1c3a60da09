"""Choosing the next token from logits: temperature, top-k, top-p (nucleus), greedy.

Kept apart from the model so generation with and without the KV cache, and any task
code, draw tokens the same way from the same seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse meaningless settings before any work, naming the argument."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest (per row) to -inf."""
    k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    # A generator lives on one device; draw there so a CPU seed works for a GPU model too.
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stream_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    device: str | torch.device = "cpu",
    start_id: int | None = None,
) -> Iterator[str]:
    """Yield the continuation of prompt as text pieces, as soon as they decode (uses the model's KV cache).

    tokenizer: a `tokenizers.Tokenizer`. An empty prompt starts from start_id (default eos_id), the end-of-text
    token, as GPT-2's unconditional samples do.
    Byte-level BPE can split one character over tokens, so a piece is held back while it ends in a partial
    character (decoded as U+FFFD) and comes out with the token that completes it.
    """
    ids = tokenizer.encode(prompt).ids if prompt else []
    if not ids:
        start = start_id if start_id is not None else eos_id
        if start is None:
            raise ValueError("an empty prompt needs start_id (or eos_id) to start from")
        ids = [start]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new: list[int] = []
    shown = ""
    for token in model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, True, eos_id):
        new.append(int(token[0]))
        if eos_id is not None and new[-1] == eos_id:
            break
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece, shown = text[len(shown) :], text
            if piece:
                yield piece
    text = tokenizer.decode([t for t in new if t != eos_id])
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown) :]  # whatever was held back at the end, partial character and all


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, **kwargs: Any) -> str:
    """The continuation of prompt as one string (see stream_text for the arguments)."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))
