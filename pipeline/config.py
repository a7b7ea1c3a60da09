"""The whole config file: composes the sections that `dataprep` and `training` define.

`load_config(path, overrides)` reads one YAML file, applies `key.path=value`
overrides (values parsed as YAML scalars) and validates everything before any
work starts. Errors name the file, the key and what was expected.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dataprep.config import DataConfig, PrepConfig, ShardsConfig, TokenizerConfig
from dataprep.errors import ScratchgptError
from training.config import FinetuneConfig, ModelConfig, TrainConfig

BUILTIN_PREFIX = "builtin:"
# Task files built from the built-in corpus (dataprep.builtin_corpus.write_kind_task).
BUILTIN_TASK_FILES = ("builtin:python-docs-kind/train", "builtin:python-docs-kind/eval")


class ConfigError(ScratchgptError, ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SlurmConfig(Section):
    """Slurm jobs (executor: slurm)."""

    partition: str | None = Field(None, description="Partition (sbatch --partition).")
    account: str | None = Field(None, description="Account (sbatch --account).")
    nodes: int | str = Field(1, description="Nodes for pretraining: a count (2), or a range (1-2) that Slurm "
                             "fills with what is free; a requeued run resumes on whatever it gets (set "
                             "train.global_batch_size so the batch stays the same).")
    tasks_per_node: int = Field(1, ge=1, description="Processes per node for pretraining (one per device).")
    cpus_per_task: int = Field(1, ge=1, description="CPUs per process.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0 on CPU clusters).")
    mem: str | None = Field(None, description="Memory per node, as sbatch takes it (e.g. 16G).")
    time: str = Field("01:00:00", description="Time limit per job, as sbatch takes it.")
    signal_seconds: int = Field(120, ge=1, description="USR1 this long before the limit: checkpoint, requeue.")
    extra_sbatch: list[str] = Field(default_factory=list, description="More #SBATCH options, one per item.")
    setup: str | None = Field(None, description="Shell line run before each job step (module load, venv).")
    network_interface: str | None = Field(None, description="GLOO/NCCL_SOCKET_IFNAME for multi-node runs.")
    data_arrays: bool = Field(False, description="scratchgpt submit: prep and shard run their datatrove steps as "
                              "Slurm job arrays (false: inside the stage's own job, on its cpus_per_task CPUs).")

    @field_validator("nodes")
    @classmethod
    def _count_or_range(cls, value: int | str) -> int | str:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", str(value).strip())
        low, high = (int(match.group(1)), match.group(2)) if match else (0, None)
        if low < 1 or (high is not None and int(high) < low):
            raise ValueError(f"expected a node count (2) or a range min-max (1-2), got {value!r}")
        return low if high is None else f"{low}-{int(high)}"


class TrackingConfig(Section):
    """MLflow tracking."""

    uri: str | None = Field(None, description="None: sqlite:///<workdir>/mlflow.db (or $MLFLOW_TRACKING_URI).")
    experiment: str = Field("scratchgpt", description="MLflow experiment name.")


class Config(Section):
    workdir: Path = Field(Path("runs/demo"), description="Every output of every stage lives below here.")
    data: DataConfig = Field(default_factory=DataConfig)
    prep: PrepConfig = Field(default_factory=PrepConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    executor: Literal["local", "slurm"] = Field(
        "local", description="local: run here; slurm: submit every stage as a Slurm job."
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    # Where the file was read from; relative paths inside it are relative to the
    # directory the command runs in, as users expect from a CLI.
    source: Path | None = Field(None, exclude=True)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of some sections, for completion markers and run tags."""
        dump = self.model_dump(mode="json", include=set(sections))
        text = json.dumps(dump, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", str(expected))


def _format_errors(err: ValidationError, path: Path | str) -> str:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "literal[")))
        key = key.replace(".LengthFilter", "").replace(".MinhashConfig", "")
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key `{key}`")
        else:
            lines.append(f"  `{key}`: {e['msg']}{got_text}")
    return "\n".join(dict.fromkeys(lines))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None or child is False or child is True:
            child = {}
            node[key] = child
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override `{'.'.join(keys)}`: `{'.'.join(keys[: i + 1])}` is not a mapping")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read, override and validate a config. `path=None` gives the defaults."""
    tree: dict[str, Any] = {}
    source = Path(path) if path is not None else Path("<defaults>")
    if path is not None:
        if not source.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            tree = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(tree).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, str(source))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    cfg.source = source if path is not None else None
    check_inputs(cfg)
    return cfg


def expand_inputs(patterns: list[str], key: str, where: str) -> list[str]:
    """Files for a list of files/globs; a pattern that matches nothing is an error naming it."""
    files: list[str] = []
    for pattern in patterns:
        if pattern.startswith(BUILTIN_PREFIX):
            files.append(pattern)
            continue
        matched = sorted(glob.glob(pattern, recursive=True))
        matched = [m for m in matched if Path(m).is_file()]
        if not matched:
            raise ConfigError(f"{where}: `{key}`: {pattern!r} matches no file (relative to {Path.cwd()})")
        files.extend(matched)
    return list(dict.fromkeys(files))


def check_inputs(cfg: Config) -> None:
    """Fail early on inputs and task files that are not there."""
    where = str(cfg.source or "<defaults>")
    expand_inputs(cfg.data.inputs, "data.inputs", where)
    expand_inputs(cfg.data.val_inputs, "data.val_inputs", where)
    for i, task in enumerate(cfg.finetune.tasks):
        for key in ("train", "eval"):
            value = getattr(task, key)
            if value.startswith(BUILTIN_PREFIX):
                if value not in BUILTIN_TASK_FILES:
                    raise ConfigError(f"{where}: `finetune.tasks.{i}.{key}`: unknown built-in {value!r}; "
                                      f"known: {sorted(BUILTIN_TASK_FILES)}")
                continue
            if not Path(value).is_file():
                raise ConfigError(
                    f"{where}: `finetune.tasks.{i}.{key}`: file {getattr(task, key)!r} does not exist"
                )
