"""The MLflow store behind `scratchgpt runs`: finding it, opening it, searching its runs and finding one run.

Holds the tag names the stages record on their runs (pipeline.core.tracking.stage_run and
each stage's tags), `RunsError` for a store, experiment or run that cannot be used,
and `Store`, a client with the experiments to search. Only an `MlflowClient` is used,
never `mlflow.set_tracking_uri`, which would leak the URI into the process
environment; mlflow is imported inside functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_config
from pipeline.core.tracking import (  # noqa: F401 - the tag names, re-exported for the other runs modules
    PARENT_TAG,
    PRETRAIN_MANIFEST_TAG,
    SHARD_MANIFEST_TAG,
    STAGE_TAG,
    TOKENIZER_TAG,
    WORKDIR_TAG,
    check_reachable,
)

SHORT_ID = 8


class RunsError(ConfigError):
    """A store, experiment or run that cannot be used; printed as `scratchgpt: <message>`, exit 2."""


# ------------------------------------------------------------------ the store


@dataclass
class Store:
    uri: str
    client: Any
    experiment_ids: list[str]
    experiment_names: dict[str, str] = field(default_factory=dict)


def resolve_tracking_uri(config: Path | None, overrides: list[str], uri: str | None) -> tuple[str, str | None]:
    """(tracking URI, default experiment name): --tracking-uri, else the config's store, else $MLFLOW_TRACKING_URI."""
    from pipeline.core.tracking import tracking_uri

    experiment = None
    cfg = None
    if config is not None:
        cfg = load_config(config, overrides, check_files=False)  # the raw data may be gone; the runs are not
        experiment = cfg.tracking.experiment
    if uri:
        return uri, experiment
    if cfg is not None:
        return tracking_uri(cfg), experiment
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    raise RunsError("no MLflow store named: pass a CONFIG (its tracking.uri, by default "
                    "sqlite:///<workdir>/mlflow.db), --tracking-uri URI, or set MLFLOW_TRACKING_URI")


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def open_store(uri: str, experiment: str | None) -> Store:
    """A client on `uri` and the experiments to search: the named one, or every active one."""
    import mlflow

    from pipeline.redact import redact, split_credentials

    uri = split_credentials(uri)  # the password goes to MLflow's variables: no message below can show it
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        # Opening a missing sqlite file would create an empty store and report "no runs".
        raise RunsError(f"no MLflow store at {db} (tracking URI {uri}): run a stage with this config first, "
                        "or pass --tracking-uri")
    check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    try:
        experiments = client.search_experiments()
    except Exception as exc:  # an unreachable server or a store that is not MLflow's
        raise RunsError(f"cannot read the MLflow store {uri}: {redact(str(exc))}") from None
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is None:
        return Store(uri, client, list(names), names)
    chosen = [eid for eid, name in names.items() if name == experiment]
    if not chosen:
        known = ", ".join(sorted(names.values())) or "none"
        raise RunsError(f"no experiment named {experiment!r} in {uri} (experiments there: {known}); "
                        "pass --experiment NAME")
    return Store(uri, client, chosen, names)


# ------------------------------------------------------------------ querying


ORDER_BY_PREFIXES = {"metrics", "metric", "params", "param", "parameter", "parameters", "tags", "tag", "attributes",
                     "attribute", "attr", "run", "dataset", "datasets"}


def order_by(sort: Iterable[str]) -> list[str]:
    """`metrics.val_bpb`, `-metrics.val_bpb`, `val_bpb` (a metric) or MLflow's `metrics.val_bpb DESC`."""
    from mlflow.entities import RunInfo

    attributes = set(RunInfo.get_orderable_attributes())
    out = []
    for key in sort:
        key = key.strip()
        direction = "ASC"
        if key.startswith("-"):
            key, direction = key[1:], "DESC"
        parts = key.rsplit(" ", 1)
        if len(parts) == 2 and parts[1].upper() in ("ASC", "DESC"):
            key, direction = parts[0].strip(), parts[1].upper()
        prefix = key.split(".", 1)[0]
        if "." not in key and not key.startswith("`"):
            key = f"attributes.{key}" if key in attributes else f"metrics.{key}"
        elif prefix not in ORDER_BY_PREFIXES:  # a config key such as train.lr: a param (compared as text)
            key = f"params.`{key}`"
        out.append(f"{key} {direction}")
    return out


def stage_group(stage: str) -> str:
    """The table a run goes in: its stage, with every fine-tuning task together as 'finetune/'."""
    return "finetune/" if stage.startswith("finetune/") else stage


def search(store: Store, stage: str | None = None, filter_string: str = "", sort: Iterable[str] = (),
           limit: int = 100) -> tuple[list[Any], bool]:
    """The matching runs (newest first unless sorted) and whether more matched than `limit`."""
    clauses = [filter_string.strip()] if filter_string and filter_string.strip() else []
    if stage:
        # `finetune` also takes its per-task children (stage `finetune/<task>`); MLflow has no OR.
        stage = stage.replace("'", "")
        clauses.append(f"tags.{STAGE_TAG} LIKE '{stage}%'")
    try:
        runs = store.client.search_runs(store.experiment_ids, filter_string=" and ".join(clauses),
                                        order_by=order_by(sort) or None, max_results=limit + 1)
    except Exception as exc:
        raise RunsError(f"MLflow could not search runs (filter {' and '.join(clauses)!r}, sort {list(sort)}): "
                        f"{_first_line(exc)}") from None
    if stage:
        runs = [r for r in runs if stage_group(r.data.tags.get(STAGE_TAG, "")).rstrip("/") == stage]
    return list(runs[:limit]), len(runs) > limit


def stages_in(store: Store, sample: int = 500) -> list[str]:
    """The stage tags of the newest runs, for a hint when `--stage` matched nothing."""
    runs = store.client.search_runs(store.experiment_ids, max_results=sample)
    return sorted({stage_group(r.data.tags.get(STAGE_TAG, "")).rstrip("/") for r in runs} - {""})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_run(store: Store, ref: str) -> Any:
    """A run by full id, unique id prefix (as the table shows) or unique run name, in any experiment of the store."""
    from mlflow.exceptions import MlflowException

    everywhere = list(store.experiment_names) or store.experiment_ids
    if len(ref) == 32:
        try:
            return store.client.get_run(ref)
        except MlflowException:
            pass
    safe = ref.replace("'", "")
    for clause in (f"attributes.run_id LIKE '{safe}%'", f"attributes.run_name = '{safe}'"):
        matches = store.client.search_runs(everywhere, filter_string=clause, max_results=10)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(m.info.run_id[:12] for m in matches)
            raise RunsError(f"run {ref!r} is ambiguous in {store.uri}: it matches {ids}; give more of the id")
    raise RunsError(f"no run {ref!r} in {store.uri} (give a run id or its first {SHORT_ID} characters, as "
                    "`scratchgpt runs` shows them)")
