"""GPT-1 style sequence classification: a linear head on the final hidden state of the last real token.

Export writes a folder `transformers.GPT2ForSequenceClassification` loads: the
transformer under `transformer.*`, the head as `score.weight`, the label names
in config.json's id2label, and the pad id that tells HF where each text ends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.model import GPT, GPTConfig

LABELS_FILE = "labels.json"


POOLINGS = ("last", "mean")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, C] features of right-padded hidden states [B, T, C] whose rows hold `lengths` real tokens."""
    if pooling == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    real = torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]
    return (hidden * real[..., None].to(hidden.dtype)).sum(1) / lengths[:, None].to(hidden.dtype)


class GPTClassifier(nn.Module):
    def __init__(self, config: GPTConfig, num_labels: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: use one of {POOLINGS}")
        self.pooling = pooling
        self.gpt = GPT(config)
        self.score = nn.Linear(config.n_embd, num_labels, bias=False)  # no bias, as GPT2ForSequenceClassification
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor | None = None,
        lm_weight: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits [B, num_labels] from right-padded idx [B, T] whose rows hold `lengths` real tokens.

        With labels: cross-entropy, plus `lm_weight` times the language-modelling loss on the real tokens
        (GPT-1's auxiliary objective, which it found helps larger data sets and speeds convergence).
        """
        hidden = self.gpt.hidden_states(idx)
        logits = self.score(pool(hidden, lengths, self.pooling))
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits.float(), labels)
        if lm_weight > 0:
            # Next-token loss on the real tokens only; the vocabulary projection of the padding is skipped, not
            # computed and masked (it is most of the LM term's cost when rows differ in length).
            positions = torch.arange(idx.size(1) - 1, device=idx.device)
            real = positions[None, :] < (lengths[:, None] - 1)
            lm_logits = self.gpt.lm_head(hidden[:, :-1][real]).float()
            # A batch of one-token texts has nothing to predict; its zero keeps lm_head in the graph on every rank.
            lm_loss = F.cross_entropy(lm_logits, idx[:, 1:][real]) if lm_logits.size(0) else lm_logits.sum()
            loss = loss + lm_weight * lm_loss
        return logits, loss


# pooling -> (the head weight's name in the export, the transformers class that reads it)
HEADS = {"last": ("score.weight", "GPT2ForSequenceClassification"),
         "mean": ("mean_score.weight", "GPT2MeanPoolForSequenceClassification")}
MEAN_POOL_MODULE = "modeling_scratchgpt"


def export_classifier(
    state_dict: dict[str, torch.Tensor],
    config: GPTConfig,
    labels: list[str],
    pad_id: int,
    tokenizer_dir: Path | None,
    out_dir: Path,
    truncate: str = "left",
    pooling: str = "last",
) -> Path:
    """A GPT2ForSequenceClassification folder (pooling "last"), or one with training/hf_mean_pool.py's class
    (pooling "mean", loaded with trust_remote_code), plus labels.json for `scratchgpt predict` (with the side
    long texts were cut on in training, so predictions see what evaluation saw)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from training.export import CONFIG_FILE, WEIGHTS_FILE, export_hf

    head_key, architecture = HEADS[pooling]
    gpt_state = {k.removeprefix("gpt."): v for k, v in state_dict.items() if k.startswith("gpt.")}
    export_hf(gpt_state, config, tokenizer_dir, out_dir)
    weights = load_file(str(out_dir / WEIGHTS_FILE))
    weights[head_key] = state_dict["score.weight"].detach().float().cpu().contiguous()
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    fields = json.loads((out_dir / CONFIG_FILE).read_text())
    fields.update(
        architectures=[architecture],
        num_labels=len(labels),
        id2label={str(i): label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=pad_id,
    )
    if pooling == "mean":
        shutil.copyfile(Path(__file__).with_name("hf_mean_pool.py"), out_dir / f"{MEAN_POOL_MODULE}.py")
        fields["auto_map"] = {"AutoModelForSequenceClassification": f"{MEAN_POOL_MODULE}.{architecture}"}
    (out_dir / CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n")
    body = {"labels": labels, "pad_id": pad_id, "truncate": truncate, "pooling": pooling}
    (out_dir / LABELS_FILE).write_text(json.dumps(body, indent=2) + "\n")
    return out_dir


def read_labels(folder: str | Path) -> dict[str, Any]:
    """labels.json of a classifier export: labels, pad_id and truncate (the side long texts are cut on)."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a fine-tuned classifier export")
    return {"truncate": "left", "pooling": "last", **json.loads(path.read_text())}


def load_classifier(folder: str | Path) -> tuple[GPTClassifier, list[str], int]:
    """A classifier exported by export_classifier: (model, label names, pad id). safetensors only."""
    from safetensors.torch import load_file

    from training.export import CONFIG_FILE, WEIGHTS_FILE, _config_from_hf, from_hf_state_dict

    folder = Path(folder)
    labels_path = folder / LABELS_FILE
    for path in (labels_path, folder / CONFIG_FILE, folder / WEIGHTS_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a fine-tuned classifier export")
    info = read_labels(folder)
    config = _config_from_hf(json.loads((folder / CONFIG_FILE).read_text()), folder / CONFIG_FILE)
    weights = load_file(str(folder / WEIGHTS_FILE))
    pooling = info["pooling"]
    if pooling not in HEADS:
        raise ValueError(f"{labels_path}: pooling {pooling!r} is not one of {sorted(HEADS)}")
    head_key = HEADS[pooling][0]
    score = weights.pop(head_key, None)
    if score is None:
        raise ValueError(f"{folder / WEIGHTS_FILE} has no {head_key}: not a {pooling}-pooling classifier export")
    model = GPTClassifier(config, len(info["labels"]), pooling=pooling)
    missing, unexpected = model.gpt.load_state_dict(
        {k: v.float() for k, v in from_hf_state_dict(weights).items()}, strict=False
    )
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit its config: missing {missing}, unexpected {unexpected}")
    model.score.weight.data.copy_(score.float())
    return model.eval(), list(info["labels"]), int(info["pad_id"])
