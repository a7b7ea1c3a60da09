"""The config sections training consumes: `model`, `train`, `finetune`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=1)
    block_size: int = Field(256, ge=2, description="Context length in tokens.")
    position: Literal["learned", "sinusoidal"] = Field(
        "learned", description="Learned position embeddings, or the fixed sin/cos table."
    )
    vocab_size: int | None = Field(None, description="None: the tokenizer's vocabulary size.")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self


class TrainConfig(Section):
    micro_batch_size: int = Field(16, ge=1, description="Sequences per process per micro-step.")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3.0e-3, gt=0)
    min_lr: float = Field(3.0e-4, ge=0, description="Floor of the cosine schedule.")
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock budget; stops with a checkpoint.")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off.")
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False
    seed: int = 1337
    eval_every: int = Field(200, ge=1)
    eval_batches: int = Field(20, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    sample_prompt: str = Field("The", description="Prompt of the sample generations logged at each eval.")
    sample_tokens: int = Field(64, ge=0)
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys merged over the generated DeepSpeed JSON (nested mappings merge key by key).",
    )


class TaskConfig(Section):
    name: str
    kind: str = Field("classification", description="classification, sft, or a registered task name.")
    train: str
    eval: str
    text_key: str = "text"
    label_key: str = "label"
    eval_text_key: str | None = Field(None, description="Text column of the eval file, if it differs (null: text_key).")
    eval_label_key: str | None = Field(None, description="Label column of the eval file (null: label_key).")
    prompt_key: str = "prompt"
    response_key: str = "response"
    truncate: Literal["left", "right"] = "left"
    max_steps: int = Field(500, ge=1)
    micro_batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    lm_loss_weight: float = Field(0.5, ge=0, description="GPT-1's auxiliary language-modelling loss.")
    eval_every: int = Field(100, ge=1)
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping early.")
    from_scratch: bool = Field(False, description="Train this task from random weights.")


class FinetuneConfig(Section):
    tasks: list[TaskConfig] = Field(default_factory=list)
    init_from: str | None = Field(None, description="Export folder to start from (null: <workdir>/pretrain/export).")
    from_scratch: bool = Field(False, description="Train every task from random weights: the no-pretraining baseline.")
