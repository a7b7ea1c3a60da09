"""The config sections training consumes: `model`, `train`, `finetune`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from dataprep.names import Name
from dataprep.schema import Section


class ModelConfig(Section):
    """The GPT's shape."""

    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: int = Field(128, ge=1, description="Width of the residual stream (divisible by n_head).")
    block_size: int = Field(256, ge=2, description="Context length in tokens.")
    position: Literal["learned", "sinusoidal"] = Field(
        "learned", description="Learned position embeddings, or the fixed sin/cos table."
    )
    vocab_size: int | None = Field(None, description="None: the tokenizer's vocabulary size.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on embeddings, attention and residuals (0 for parity with the export)."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self


class TrainConfig(Section):
    """Pretraining: optimizer, schedule, DeepSpeed, evaluation and checkpoints."""

    micro_batch_size: int = Field(16, ge=1, description="Sequences per process per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, description="Sequences per optimizer step over all processes; grad_accum then follows "
        "from the world size (global / (micro_batch_size x processes)), so a resume on another number of "
        "processes is the same run. Leave grad_accum unset (1) with it.")
    lr: float = Field(3.0e-3, gt=0, description="Peak learning rate of AdamW (under muon: of the AdamW part).")
    min_lr: float = Field(3.0e-4, ge=0, description="Floor of the schedule (cosine or wsd).")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps at the start (cosine and wsd).")
    max_steps: int = Field(
        2000, ge=1, description="Optimizer steps; the schedule ends here (or at max_minutes).")
    max_minutes: float | None = Field(
        None, gt=0, description="Wall-clock budget of training, counted across resumes; stops with a checkpoint. "
        "The decay (cosine or wsd) ends with it when it comes before max_steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not biases or norms).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw: AdamW everywhere. muon: DeepSpeed's Muon on the blocks' 2-D weights, AdamW "
        "(train.lr, betas) on embeddings, head, biases and norms.")
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak rate; the schedule scales it as it scales train.lr.")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's momentum after its warm-up.")
    muon_momentum_start: float = Field(0.85, ge=0, lt=1, description="Muon's momentum at step 0.")
    muon_momentum_warmup: int = Field(300, ge=0, description="Steps from muon_momentum_start to muon_momentum.")
    muon_ns_steps: int = Field(5, ge=1, description="Newton-Schulz iterations per Muon update.")
    muon_ns_method: Literal["gram", "standard"] = Field(
        "gram", description="DeepSpeed's Newton-Schulz variant (gram iterates on the smaller Gram matrix).")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine: warm-up then cosine to min_lr. wsd: warm-up, stable at lr, then a decay to "
        "min_lr over the last decay_fraction of the steps or of max_minutes (a WSD run can be extended).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the run spent decaying.")
    decay_shape: Literal["linear", "1-sqrt"] = Field("linear", description="wsd: shape of the decay.")
    compile: bool = Field(False, description="torch.compile the model under DeepSpeed (engine.compile).")
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off (muon: off, ZeRO would clip Muon's updates).")
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device computes it natively, else fp32."
    )
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")
    seed: int = Field(1337, description="Seed of weights, data order and sampling.")
    eval_every: int = Field(200, ge=1, description="Steps between evaluations (val loss, bits per byte, a sample).")
    eval_batches: int = Field(20, ge=1, description="Micro-batches of the val split per evaluation.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (one is also written at the end).")
    log_every: int = Field(10, ge=1, description="Steps between logged training metrics.")
    sample_prompt: str = Field("The", description="Prompt of the sample generations logged at each eval.")
    sample_tokens: int = Field(64, ge=0, description="Tokens of each sample generation.")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys merged over the generated DeepSpeed JSON (nested mappings merge key by key).",
    )


    @model_validator(mode="after")
    def _floor_below_peak(self) -> TrainConfig:
        if self.min_lr > self.lr:  # the schedule would rise from its warm-up to min_lr
            raise ValueError(f"train.min_lr ({self.min_lr:g}) is above train.lr ({self.lr:g}): set train.min_lr "
                             f"too, e.g. train.min_lr={self.lr / 10:g}")
        return self

    @model_validator(mode="after")
    def _one_batch_rule(self) -> TrainConfig:
        # grad_accum 1 (the default, and what a config snapshot writes back) means "derived".
        if self.global_batch_size is not None and self.grad_accum != 1:
            raise ValueError("set train.global_batch_size or train.grad_accum, not both: with "
                             "global_batch_size, grad_accum follows from the number of processes")
        return self


class TaskConfig(Section):
    """One fine-tuning task."""

    name: Name = Field(description="Task name: its folder under <workdir>/finetune and its MLflow run.")
    kind: str = Field("classification", description="classification, sft, or a registered task name.")
    train: str = Field(description="Training file (.tsv, .csv, .jsonl, .parquet) or builtin:python-docs-kind/train.")
    eval: str = Field(description="Evaluation file, as train.")
    text_key: str = Field("text", description="Text column.")
    label_key: str = Field("label", description="Label column (classification).")
    eval_text_key: str | None = Field(None, description="Text column of the eval file, if it differs (null: text_key).")
    eval_label_key: str | None = Field(None, description="Label column of the eval file (null: label_key).")
    prompt_key: str = Field("prompt", description="Prompt column (sft).")
    response_key: str = Field("response", description="Response column (sft).")
    truncate: Literal["left", "right"] = Field(
        "left", description="Texts longer than block_size keep their end (left) or their start (right)."
    )
    max_steps: int = Field(2000, ge=1, description="Optimizer steps at most. From a pretrained model `epochs` ends "
                           "the run sooner on a task of fewer than max_steps x batch / epochs examples (21,333 with "
                           "the defaults on one process); early stopping may end either arm sooner.")
    epochs: float | None = Field(
        3.0, gt=0, description="From a pretrained model: passes over the training examples, at most max_steps "
        "(GPT-1 fine-tuned for 3; more passes over a small task overfit it: bench/finetune.py --labelled). An epoch "
        "is the whole batches of examples / (micro_batch_size x processes), rounded down (1,000 examples in batches "
        "of 32: 31 steps, 93 for 3), so more processes take fewer steps. The learning-rate schedule, warm-up "
        "included, spans the planned steps; a max_steps you set that they end sooner is warned once. The scratch "
        "arm ignores it: from random weights a model needs many passes, so it trains up to max_steps with early "
        "stopping. null: max_steps alone.")
    micro_batch_size: int = Field(32, ge=1, description="Examples per process per step.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar lengths together (from pools of 50 shuffled batches), so "
        "little compute goes to padding (a step cost 0.55x a plain one on SST-2 in bench/finetune_step_time.py). "
        "false: plain shuffled batches.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the pretrained body (set by "
                      "bench/sweep_finetune.py on this project's small models; lower it for large ones).")
    head_lr: float | None = Field(
        1e-2, gt=0, description="Peak learning rate of the new classification head (null: lr). The head starts "
        "from random weights while the body is pretrained, so it takes a larger rate.")
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="Discriminative fine-tuning: block i of n trains at lr x decay^(n-1-i), the "
        "embeddings at lr x decay^n (1: one rate for the whole body).")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the run's steps spent warming the rate up.")
    pooling: Literal["last", "mean"] = Field(
        "mean", description="classification: the head reads the last real token (GPT-1, and what "
        "GPT2ForSequenceClassification does), or the mean over the real tokens (exported with its own head class, "
        "see Fine-tuning).")
    lm_loss_weight: float = Field(0.5, ge=0, description="GPT-1's auxiliary language-modelling loss.")
    eval_every: int = Field(200, ge=1, description="Steps between evaluations.")
    patience: int = Field(
        5, ge=1, description="Evaluations without improvement before stopping early (at the peak rate, dev accuracy "
        "can dip for two or three evaluations before it climbs again).")
    from_scratch: bool = Field(False, description="Train this task from random weights.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] | None = Field(
        "fp32", description="Precision of this task's engine (null: train.precision). fp32 by default: bf16 "
        "rounding made dev accuracy jump by points between evaluations.")
    seed: int | None = Field(None, description="Seed of the head's initial weights and the batch order (null: "
                             "train.seed); vary it to see how much a result owes to chance.")


class FinetuneConfig(Section):
    """Fine-tuning tasks."""

    tasks: list[TaskConfig] = Field(
        default_factory=list, description="The tasks, each fine-tuned from the pretrained model."
    )
    init_from: str | None = Field(None, description="Export folder to start from (null: <workdir>/pretrain/export).")
    from_scratch: bool = Field(False, description="Train every task from random weights: the no-pretraining baseline.")
    vs_scratch: bool = Field(
        False, description="Run every task twice per seed, from the pretrained model and from random weights, and "
        "report the gain of pretraining with its spread over seeds (scratchgpt finetune --vs-scratch).")
    seeds: int = Field(1, ge=1, le=100, description="Fine-tune each task (each arm) with this many seeds: the task's "
                       "seed (or train.seed) and the ones after it.")

    @model_validator(mode="after")
    def _one_arm_rule(self) -> FinetuneConfig:
        if self.vs_scratch and self.from_scratch:
            raise ValueError("set finetune.vs_scratch (both arms) or finetune.from_scratch (the scratch arm only), "
                             "not both")
        for i, task in enumerate(self.tasks):
            if self.vs_scratch and task.from_scratch:
                raise ValueError(f"finetune.tasks.{i}.from_scratch: task {task.name!r} asks for the scratch arm only, "
                                 "but finetune.vs_scratch runs both arms")
        return self

    @model_validator(mode="after")
    def _distinct_folders(self) -> FinetuneConfig:
        # Results go to finetune/<task>[-scratch][-seed<N>] and finetune/<task>-comparison.json.
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            if task.name in seen:
                raise ValueError(f"finetune.tasks.{i}.name: {task.name!r} is used by an earlier task")
            if re.search(r"-(scratch|seed\d+|comparison)$", task.name):
                raise ValueError(f"finetune.tasks.{i}.name: {task.name!r} ends like the folders of another task's "
                                 "arms and seeds (-scratch, -seed<N>, -comparison); choose another name")
            seen.add(task.name)
        return self
