"""The stage registry: what each stage reads, what it depends on, what it writes, and the function that does it.

A stage is a `StageSpec`; its entry, `run(ctx) -> summary`, does only the stage's
work. Everything around it (completion check, clean-or-resume, the workdir lock,
the MLflow run, the marker, the summary line, errors) is the runner's
(`pipeline.core.runner`). Adding a stage is its own module under
`pipeline/stages/` plus one `register(...)` line here.

Entries and hooks are "module:function" strings, imported only when used, so
that `scratchgpt --help` does not pay for torch or datatrove.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple[str, ...]  # config sections whose change redoes the stage
    upstream: tuple[str, ...]  # stages whose outputs it reads: a change there redoes it too
    entry: str  # "module:function": run(ctx) -> summary dict
    help: str = ""
    # Folders under the workdir that hold this stage's outputs: removed when it starts afresh.
    outputs: tuple[str, ...] = ()
    # "module:function": cfg -> list of input files (paths) whose content is part of the stage's identity.
    inputs: str | None = None
    # "module:function": cfg -> str, a fingerprint of the finished stage's outputs, read by downstream identities.
    digest: str | None = None
    # "module:function": cfg -> dict, the config the identity covers (default: the `sections`, as they are).
    identity_config: str | None = None
    # "module:function": cfg -> dict, the config that decides whether earlier outputs can be continued rather
    # than removed when the identity changed (a WSD run given more steps extends its checkpoints).
    resume_config: str | None = None
    # "module:function": (cfg, resumed) -> None, raising the stage's refusals of its config or inputs before the
    # runner removes or continues anything of an earlier run (`resumed`: the earlier outputs will be continued).
    check: str | None = None
    # "module:function": (cfg, marker) -> str, why the outputs of a stage marked complete cannot be used as they
    # are (missing, truncated, edited), or "": the stage then runs again instead of being skipped.
    verify: str | None = None
    repair_resumes: bool = False  # outputs that fail verify are continued (pretrain re-exports), not removed
    # Extra command-line switches: (flag, the override it stands for, help).
    flags: tuple[tuple[str, str, str], ...] = ()  # (--flag, the override it stands for, help)
    options: tuple[tuple[str, str, str], ...] = ()  # (--option N, the key it sets to N, help)
    # As a Slurm job: its batch template (slurm/templates/<name>.sbatch), whether its work is datatrove steps
    # (which slurm.data_arrays may run as job arrays), and whether it runs as srun ranks on slurm.nodes.
    template: str = "data"
    datatrove: bool = False
    ranks: bool = False

    def hook(self, attr: str) -> Callable[..., Any] | None:
        target = getattr(self, attr)
        if target is None:
            return None
        module, _, func = target.partition(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, StageSpec] = {}


def register(stage: StageSpec) -> StageSpec:
    for up in stage.upstream:
        if up not in STAGES:
            raise ValueError(f"stage {stage.name}: upstream {up!r} must be registered before it")
    STAGES[stage.name] = stage
    return stage


def ancestry(name: str) -> tuple[str, ...]:
    """The stages whose outputs `name` builds on, directly or through others, in chain order."""
    found: set[str] = set()
    todo = list(STAGES[name].upstream)
    while todo:
        up = todo.pop()
        if up not in found:
            found.add(up)
            todo.extend(STAGES[up].upstream)
    return tuple(s for s in STAGES if s in found)


# The chain, in order.
register(StageSpec(
    "prep", ("data", "prep"), (), "pipeline.stages.prep:run",
    "deduplicate and quality-filter raw text into clean documents", outputs=("prep",),
    inputs="pipeline.stages.prep:input_files", digest="pipeline.stages.prep:digest", datatrove=True,
    check="pipeline.stages.prep:check", verify="pipeline.stages.prep:verify"))
register(StageSpec(
    "tokenizer", ("tokenizer",), ("prep",), "pipeline.stages.tokenizer:run",
    "train a byte-level BPE tokenizer on the clean documents", outputs=("tokenizer",),
    digest="pipeline.stages.tokenizer:digest", verify="pipeline.stages.tokenizer:verify"))
register(StageSpec(
    "shard", ("data", "shards"), ("prep", "tokenizer"), "pipeline.stages.shard:run",
    "tokenize clean documents into Arrow token shards", outputs=("shard", "shards"),
    inputs="pipeline.stages.shard:input_files", digest="pipeline.stages.shard:digest", datatrove=True,
    verify="pipeline.stages.shard:verify"))
register(StageSpec(
    "pretrain", ("model", "train"), ("shard",), "pipeline.stages.pretrain:run",
    "pretrain the GPT with DeepSpeed ZeRO-3", outputs=("pretrain",),
    digest="pipeline.stages.pretrain:digest", resume_config="pipeline.stages.pretrain:resume_config",
    identity_config="pipeline.stages.pretrain:identity_config",
    check="pipeline.stages.pretrain:check", verify="pipeline.stages.pretrain:verify", repair_resumes=True,
    template="pretrain", ranks=True))
# finetune declares no outputs to clear: it never resumes, each task rewrites its own folder, and the
# --from-scratch baseline (finetune/<task>-scratch) must stay beside the pretrained run's results.
register(StageSpec(
    "finetune", ("finetune", "custom_import"), ("pretrain",), "pipeline.stages.finetune:run",
    "fine-tune the pretrained model on each task in finetune.tasks",
    inputs="pipeline.stages.finetune:input_files", template="finetune", verify="pipeline.stages.finetune:verify",
    flags=(("--from-scratch", "finetune.from_scratch=true",
            "train the same architecture from random weights (the no-pretraining baseline)"),
           ("--vs-scratch", "finetune.vs_scratch=true",
            "fine-tune from the pretrained model and from random weights alike, and print the gain")),
    options=(("--seeds", "finetune.seeds", "fine-tune each arm with N seeds; the gain is given with its spread"),)))
