"""MLflow tracking: where runs go, and one run per stage (child runs of a pipeline run).

Default store: `sqlite:///<workdir>/mlflow.db` with artifacts under
`<workdir>/mlartifacts`; `tracking.uri` or `$MLFLOW_TRACKING_URI` points at a server.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dataprep.private import private_sqlite_store
from pipeline.config import Config, ConfigError
from pipeline.redact import redact, split_credentials

# Tag names, written here and by the stages, read by `scratchgpt runs` (pipeline.runs).
STAGE_TAG = "stage"
WORKDIR_TAG = "workdir"
PARENT_TAG = "mlflow.parentRunId"
CONFIG_HASH_TAG = "config_hash"
GIT_COMMIT_TAG = "git_commit"
IDENTITY_TAG = "stage_identity"  # the runner's identity of the stage run: config, inputs, upstream outputs
PRETRAIN_MANIFEST_TAG = "shard_manifest_sha256"  # on pretrain runs: the shards it trained on
SHARD_MANIFEST_TAG = "manifest_sha256"  # on shard runs: the manifest they wrote
TOKENIZER_TAG = "tokenizer_sha256"
TASK_TAG = "task"
KIND_TAG = "kind"
ARM_TAG = "arm"  # fine-tuning: "pretrained" or "scratch"
SEED_TAG = "seed"  # fine-tuning: the seed of the head and the batch order
RESULTS_TAG = "results_dir"  # fine-tuning: the folder this arm and seed wrote (export/, metrics.json)
STOPPED_TAG = "stopped_by"

# mlflow.set_tracking_uri also exports $MLFLOW_TRACKING_URI. Values that got there only that way are
# remembered, so that a second config in the same process (another workdir) is not sent to the first's store.
_EXPORTED_BY_US: set[str] = set()


def tracking_uri(cfg: Config) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI as the user set it, else the workdir's sqlite store."""
    if cfg.tracking.uri:
        return split_credentials(cfg.tracking.uri)  # a password moves to MLflow's variables, out of the URI
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env not in _EXPORTED_BY_US:
        return split_credentials(env)
    return f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}"


def use_tracking(cfg: Config) -> str:
    """Point MLflow at the config's store; returns the URI."""
    import mlflow

    uri = tracking_uri(cfg)
    private_sqlite_store(uri)  # the store holds params and tags: readable by its owner only
    if os.environ.get("MLFLOW_TRACKING_URI") != uri:
        _EXPORTED_BY_US.add(uri)
    mlflow.set_tracking_uri(uri)
    return uri


class TrackingUnreachable(ConfigError):
    """The configured MLflow server does not answer."""


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a server that does not answer: MLflow's client retries for minutes before it gives up, and a
    stage checks this before it removes anything of an earlier run."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # it answered (a proxy without /health, an auth wall): let MLflow's own request say more
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnreachable(f"cannot reach the MLflow server at {redact(uri)}: {reason} "
                                  "(is `mlflow server` running there? `tracking.uri` or $MLFLOW_TRACKING_URI "
                                  "names it)") from None


def git_commit() -> str:
    """The commit of the code that ran, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'train.lr': '0.003', ...}, the form MLflow params take."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: redact(str(tree))[:6000]}  # params are shown to everyone who can read the store


def setup_experiment(cfg: Config) -> str:
    """Point MLflow at the configured store and return the experiment id."""
    import mlflow

    uri = use_tracking(cfg)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        # Keep artifacts beside the local store instead of ./mlruns in the current directory.
        artifact_location = (Path(cfg.workdir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
    except Exception:  # created by a concurrent process in the meantime
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def stage_run(
    cfg: Config,
    stage: str,
    sections: tuple[str, ...] = (),
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """An MLflow run tagged with the stage, the config hash and the git commit.

    Logs the config sections the stage consumes as params. Nested under
    `parent_run_id` (or $SCRATCHGPT_PARENT_RUN_ID) when given.
    """
    import mlflow

    experiment_id = setup_experiment(cfg)
    parent_run_id = parent_run_id or os.environ.get("SCRATCHGPT_PARENT_RUN_ID")
    all_tags = {
        STAGE_TAG: stage,
        CONFIG_HASH_TAG: cfg.section_hash(*sections) if sections else "",
        GIT_COMMIT_TAG: git_commit(),
        WORKDIR_TAG: str(Path(cfg.workdir).resolve()),
        **(tags or {}),
    }
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    nested = mlflow.active_run() is not None  # a stage run inside the pipeline's (or a task's inside a stage's)
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=all_tags, nested=nested) as run:
        if sections:
            params = flatten(cfg.model_dump(mode="json", include=set(sections)))
            mlflow.log_params(params)
        yield run


def upstream_tags(parts: dict[str, Any]) -> dict[str, str]:
    """`upstream.<stage>` tags from an identity's parts: which outputs of the stages before this run read."""
    return {f"upstream.{name}": str(digest)[:250] for name, digest in (parts.get("upstream") or {}).items()}
