"""Every path under the workdir, in one table: stages, commands, lineage and Slurm read them from here.

    <workdir>/
      prep/          input/ output/ removed/ work/ logs/ stats.json
      tokenizer/     tokenizer.json and the transformers files
      shard/         logs/ removed/ (bookkeeping of the shard stage)
      shards/        train/ val/ manifest.json (the token shards)
      pretrain/      checkpoints/ export/ mlflow_run_id
      finetune/      <task>/ (export, metrics) and <task>-scratch/, data/ (built-in task files)
      slurm/         config.yaml, <stage>.sbatch, logs/, jobs.json
      mlflow.db      the default MLflow store; mlartifacts/ beside it
      scratchgpt.lock  who is running a stage here now
    <stage>/_COMPLETE.json, <stage>/_STARTED.json: the runner's markers (pipeline.core.runner)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MARKER = "_COMPLETE.json"  # a finished stage: its identity and summary
STARTED = "_STARTED.json"  # the identity a stage was started with: same identity resumes, another starts clean
RUN_ID = "mlflow_run_id"  # the stage's MLflow run, reopened when an interrupted stage resumes


@dataclass(frozen=True)
class Workdir:
    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    # prep
    @property
    def prep(self) -> Path:
        return self.root / "prep"

    @property
    def prep_input(self) -> Path:
        return self.prep / "input"

    @property
    def prep_output(self) -> Path:
        return self.prep / "output"

    @property
    def prep_removed(self) -> Path:
        return self.prep / "removed"

    @property
    def prep_stats(self) -> Path:
        return self.prep / "stats.json"

    # tokenizer, shards
    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def shard_bookkeeping(self) -> Path:
        return self.root / "shard"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.shards / "manifest.json"

    # pretrain
    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def checkpoints(self) -> Path:
        return self.pretrain / "checkpoints"

    @property
    def export(self) -> Path:
        return self.pretrain / "export"

    # finetune
    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    def task(self, name: str, scratch: bool = False, seed: int | None = None) -> Path:
        """A task's results; `seed` names the runs of finetune.seeds after the first."""
        return self.finetune / (name + ("-scratch" if scratch else "") + ("" if seed is None else f"-seed{seed}"))

    @property
    def builtin_tasks(self) -> Path:
        return self.finetune / "data"

    # slurm, tracking, lock
    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def lock(self) -> Path:
        return self.root / "scratchgpt.lock"

    def marker(self, stage: str) -> Path:
        return self.stage(stage) / MARKER

    def started(self, stage: str) -> Path:
        return self.stage(stage) / STARTED

    def run_id_file(self, stage: str) -> Path:
        return self.stage(stage) / RUN_ID


def workdir_of(cfg: object) -> Workdir:
    """The config's workdir (anything with a `workdir` attribute), as given (relative paths stay relative)."""
    return Workdir(Path(cfg.workdir))  # type: ignore[attr-defined]
