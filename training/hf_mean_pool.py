"""The head `pooling: mean` trains, as a transformers class: a GPT-2 that classifies the mean of its real tokens.

transformers' GPT2ForSequenceClassification reads the last real token only, so a
mean-pooled classifier cannot be exported as one: its logits would differ. This file
is copied into such an export as `modeling_scratchgpt.py`, and config.json's
`auto_map` points at it, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

gives the logits the fine-tuning scored. It imports nothing from scratchgpt. The head
weight is `mean_score.weight`, not `score.weight`: loaded as GPT2ForSequenceClassification,
the folder says its `score.weight` is missing rather than scoring with the wrong pooling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GPT2Model, GPT2PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class GPT2MeanPoolForSequenceClassification(GPT2PreTrainedModel):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.mean_score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        hidden = self.transformer(input_ids, attention_mask=attention_mask, **kwargs)[0]
        if attention_mask is None:  # right-padded with the pad id, as scratchgpt trains
            pad = self.config.pad_token_id
            attention_mask = torch.ones_like(input_ids) if pad is None else (input_ids != pad).long()
            attention_mask[:, 0] = 1  # every row has a first token (an empty text is encoded as one pad id)
        real = attention_mask.to(hidden.dtype)[..., None]
        logits = self.mean_score((hidden * real).sum(1) / real.sum(1).clamp(min=1))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
