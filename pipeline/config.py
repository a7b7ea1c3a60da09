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
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, field_validator

from dataprep.config import DataConfig, PrepConfig, ShardsConfig, TokenizerConfig
from dataprep.errors import ScratchgptError
from dataprep.names import Name
from dataprep.schema import Section
from pipeline.redact import redact
from pipeline.slurm_values import option_problem, setup_problem, value_problem
from training.config import FinetuneConfig, ModelConfig, TrainConfig

BUILTIN_PREFIX = "builtin:"
# Task files built from the built-in corpus (dataprep.builtin_corpus.write_kind_task).
BUILTIN_TASK_FILES = ("builtin:python-docs-kind/train", "builtin:python-docs-kind/eval")


class ConfigError(ScratchgptError, ValueError):
    """A config file that cannot be used; the message names the file and the key."""




def _sbatch_option(option: str) -> str:
    problem = option_problem(option)
    if problem:
        raise ValueError(problem)
    return option


SbatchOption = Annotated[str, AfterValidator(_sbatch_option)]


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
    extra_sbatch: list[SbatchOption] = Field(default_factory=list, description="More #SBATCH options, one per item.")
    setup: str | None = Field(None, description="Shell line run before each job step (module load, venv).")
    network_interface: str | None = Field(None, description="GLOO/NCCL_SOCKET_IFNAME for multi-node runs.")
    data_arrays: bool = Field(False, description="scratchgpt submit: prep and shard run their datatrove steps as "
                              "Slurm job arrays (false: inside the stage's own job, on its cpus_per_task CPUs).")

    # Checked here, at load, because more than one writer puts them into batch scripts (submit's templates,
    # datatrove's Slurm executor): nothing reaches either unchecked.
    @field_validator("partition", "account", "mem", "time", "network_interface")
    @classmethod
    def _one_safe_token(cls, value: str | None, info: ValidationInfo) -> str | None:
        problem = value_problem(info.field_name, value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("setup")
    @classmethod
    def _one_shell_line(cls, value: str | None) -> str | None:
        problem = setup_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

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
    experiment: Name = Field("scratchgpt", description="MLflow experiment name.")


# Keys that do not change what a stage makes, so a change of them resumes or skips rather than redoes:
# how hard shards are checked before training reads them; the weights of data.sources (prep and shards
# are made per source whatever the weights; pretraining's identity adds them back, pipeline.stages.pretrain).
NOT_IDENTITY: dict[str, Any] = {"shards": {"verify"}, "data": {"sources": {"__all__": {"weight"}}}}


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
    custom_import: list[str] = Field(
        default_factory=list, description="Your own Python modules (dotted names, or .py files) imported before any "
        "stage runs, so that the task kinds and objectives they register work from the CLI.")

    # Where the file was read from; relative paths inside it are relative to the
    # directory the command runs in, as users expect from a CLI.
    source: Path | None = Field(None, exclude=True)

    def section_dump(self, *sections: str) -> dict[str, Any]:
        """Some sections as JSON, without the keys that do not change what a stage makes (NOT_IDENTITY)."""
        # without data.sources when there are none: a data.inputs workdir made before they existed stays complete
        exclude = NOT_IDENTITY if self.data.sources else {**NOT_IDENTITY, "data": {"sources": True}}
        return self.model_dump(mode="json", include=set(sections), exclude=exclude)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of some sections, for completion markers and run tags."""
        text = json.dumps(self.section_dump(*sections), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key(loc: tuple[Any, ...]) -> str:
    """The user's key path of an error: no union branch tags (`literal[False]`) and no model-class names."""
    parts = [str(p) for p in loc if not str(p).startswith(("function-", "literal[")) and not str(p)[:1].isupper()]
    return ".".join(parts)


def _message(error: dict[str, Any]) -> str:
    if error["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return "expected a mapping of its keys"
    return error["msg"].removeprefix("Value error, ")


def _format_errors(err: ValidationError, path: Path | str) -> str:
    """One line per key the user got wrong, in their terms.

    A section that may be `false` (a filter, minhash) is a union: pydantic reports both branches. When the
    value was a mapping the user meant the section, so the `false` branch's complaint is dropped; when it
    was neither, one line says what the key takes.
    """
    errors = err.errors()
    branchy = {_key(e["loc"]) for e in errors if any(str(p).startswith("literal[") for p in e["loc"])}
    lines = [f"{path}: invalid config"]
    for e in errors:
        key, got = _key(e["loc"]), e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {redact(repr(got))})"
        union = next((b for b in branchy if key == b or key.startswith(b + ".")), None)
        if union is not None:
            if any(str(p).startswith("literal[") for p in e["loc"]):
                if isinstance(got, dict):
                    continue  # the mapping branch says what is wrong inside it
                lines.append(f"  `{key}`: expected false, true or a mapping of its keys{got_text}")
                continue
            if key == union and e["type"] in ("model_type", "dict_type", "model_attributes_type"):
                continue  # said once, by the line above
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key `{key}`")
        else:
            lines.append(f"  `{key}`: {_message(e)}{got_text}")
    lines = list(dict.fromkeys(lines))
    if len(lines) == 2:  # one problem: one line
        return f"{lines[0]}: {lines[1].strip()}"
    return "\n".join(lines)


def _check_unique_keys(node: yaml.Node, source: Path, path: str = "") -> None:
    """A key given twice in one mapping is an error naming it and both lines (plain YAML keeps the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            full = f"{path}.{key}" if path else key
            if key in seen:
                raise ConfigError(f"{source}: key `{full}` is given twice, on lines {seen[key]} and {line}; keep one")
            seen[key] = line
            _check_unique_keys(value_node, source, full)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, source, f"{path}.{i}")


def _utf8_text(source: Path) -> str:
    data = source.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the config as UTF-8 "
                          f"(e.g. `iconv -f GB18030 -t UTF-8`)") from None


def _yaml_error(source: Path, exc: yaml.YAMLError, text: str) -> ConfigError:
    """`file:line:col: problem`, the place an editor jumps to, instead of PyYAML's several-line report."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: PyYAML gives its place in characters
        line = text[: exc.position].count("\n") + 1
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        return ConfigError(f"{source}:{line}: not valid YAML: {exc.reason} (U+{char:04X})")
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return ConfigError(f"{source}: not valid YAML: {exc}")
    problem = getattr(exc, "problem", None) or "a syntax error"
    context = getattr(exc, "context", None)
    return ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
                       + (f" ({context})" if context else ""))


def read_yaml(source: Path) -> Any:
    text = _utf8_text(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_unique_keys(node, source)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc, text) from None


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


def _list_index(items: list[Any], key: str, keys: list[str], i: int, source: str) -> int:
    """`data.sources.0`: a list item by its position, which must exist (an override edits, it does not append)."""
    where = ".".join(keys[:i])
    if not key.isdecimal() or not key.isascii():
        raise ConfigError(f"{source}: override `{'.'.join(keys)}`: `{where}` is a list; name an item by its "
                          f"position, e.g. `{where}.0`")
    if int(key) >= len(items):
        raise ConfigError(f"{source}: override `{'.'.join(keys)}`: `{where}` has {len(items)} item(s), "
                          f"numbered from 0")
    return int(key)


def apply_override(tree: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key, keys, i, source)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override `{'.'.join(keys)}`: `{'.'.join(keys[:i])}` is not a mapping")
        if last:
            node[key] = value
            break
        child = node.get(key)
        if child is None and keys[i + 1].isdecimal():
            raise ConfigError(f"{source}: override `{'.'.join(keys)}`: `{'.'.join(keys[: i + 1])}` is not in the "
                              f"config, so it has no item {keys[i + 1]}; set the whole list in the file")
        if child is None or child is False or child is True:  # an absent or switched section: start it
            child = node[key] = {}
        node = child


def load_config(path: str | Path | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read, override and validate a config. `path=None` gives the defaults. `check_files=False` skips the check
    that its input and task files exist, for commands that only read what the runs left (`scratchgpt runs`)."""
    tree: dict[str, Any] = {}
    source = Path(path) if path is not None else Path("<defaults>")
    if path is not None:
        if not source.is_file():
            raise ConfigError(f"config file {source} does not exist")
        tree = read_yaml(source)
        if tree is None:  # an empty file would silently run the built-in demo
            raise ConfigError(f"{source} is empty (or only comments): start from configs/default.yaml and set "
                              f"at least `workdir`")
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
    if check_files:
        check_inputs(cfg)
    import_custom(cfg.custom_import, str(source))
    return cfg


def import_custom(modules: list[str], where: str) -> None:
    """Import the user's modules named by `custom_import` (a dotted name, or a path to a .py file)."""
    import importlib
    import importlib.util
    import sys

    for i, name in enumerate(modules):
        key = f"custom_import.{i}"
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if not path.is_file():
                    raise ConfigError(f"{where}: `{key}`: file {name!r} does not exist")
                digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]  # a.py and b/a.py are two modules
                module_name = f"scratchgpt_custom_{path.stem}_{digest}"
                if module_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ConfigError:
            raise
        except ImportError as exc:
            raise ConfigError(f"{where}: `{key}`: cannot import {name!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's module failed while loading: say where
            raise ConfigError(f"{where}: `{key}`: importing {name!r} failed: {type(exc).__name__}: {exc}") from None


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
    for i, source in enumerate(cfg.data.sources):
        expand_inputs(source.inputs, f"data.sources.{i}.inputs", where)
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
