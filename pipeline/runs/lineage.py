"""`scratchgpt runs --lineage`: the tokenizer, shards, prep stats and raw inputs a model or run came from.

`lineage` starts from a run (pipeline.runs.store.find_run) or a path (an export
folder, a checkpoint folder or a workdir) and fills a `Lineage` section by section
(the `_fill_*` functions) from the files in the workdir and the MLflow runs that
recorded them, with a warning wherever the two disagree; `format_lineage` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.stages import STAGES, ancestry
from pipeline.core.tracking import ARM_TAG, RESULTS_TAG, TASK_TAG
from pipeline.core.workdir import Workdir
from pipeline.runs.store import (
    PARENT_TAG,
    PRETRAIN_MANIFEST_TAG,
    SHARD_MANIFEST_TAG,
    SHORT_ID,
    STAGE_TAG,
    TOKENIZER_TAG,
    WORKDIR_TAG,
    RunsError,
    Store,
    find_run,
    open_store,
)
from pipeline.runs.table import fmt_time

# What the model's lineage covers: the data stages pretraining builds on, each with the stages before it.
ALL_UPSTREAM = ancestry("pretrain")
UPSTREAM = {name: (*ancestry(name), name) for name in ALL_UPSTREAM}
MARKER_STAGES = tuple(STAGES)


@dataclass
class Lineage:
    """Where a model came from; each section holds what the files say and what the MLflow runs recorded."""

    origin: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, Any] = field(default_factory=dict)
    prep: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    markers: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("origin", "model", "tokenizer", "shards", "prep", "inputs", "markers",
                                              "warnings")}


def _run_summary(run: Any) -> dict[str, Any]:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "stage": run.data.tags.get(STAGE_TAG),
            "status": run.info.status, "experiment_id": run.info.experiment_id,
            "workdir": run.data.tags.get(WORKDIR_TAG)}


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _newest_run(store: Store | None, clauses: list[str]) -> Any:
    """The newest run matching every clause, in any experiment of the store; None without a store or a match."""
    if store is None:
        return None
    everywhere = list(store.experiment_names) or store.experiment_ids
    try:
        found = store.client.search_runs(everywhere, filter_string=" and ".join(clauses),
                                         order_by=["attributes.start_time DESC"], max_results=20)
    except Exception:
        return None
    finished = [r for r in found if r.info.status == "FINISHED"]
    return (finished or found or [None])[0]


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "") + "'"


def _run_by_id(store: Store | None, run_id: str) -> Any:
    if store is None or not run_id:
        return None
    try:
        return store.client.get_run(run_id)
    except Exception:
        return None


def lineage(ref: str, store: Store | None) -> Lineage:
    """Lineage of a run (id, id prefix or name) or of a path (export folder, checkpoint folder or workdir)."""
    path = Path(ref)
    if path.exists():
        return _lineage_of_path(path.resolve(), store)
    if store is None:
        raise RunsError(f"{ref!r} is neither a folder nor a file, and no MLflow store is named to look it up as a run: "
                        "pass a CONFIG, --tracking-uri or MLFLOW_TRACKING_URI")
    run = find_run(store, ref)
    return _lineage_of_run(run, store)


def _lineage_of_run(run: Any, store: Store) -> Lineage:
    stage = run.data.tags.get(STAGE_TAG, "")
    workdir = Path(run.data.tags[WORKDIR_TAG]) if run.data.tags.get(WORKDIR_TAG) else None
    lin = Lineage(origin={"kind": "run", **_run_summary(run)})
    if stage.startswith("finetune"):
        parent = _run_by_id(store, run.data.tags.get(PARENT_TAG, "")) if "/" in stage else run
        init_from = (parent or run).data.params.get("finetune.init_from", "None")
        scratch = run.data.tags.get(ARM_TAG) == "scratch" or run.data.params.get("task.from_scratch") == "True"
        if init_from not in ("None", "") and not scratch:
            # The model came from another export folder: its lineage is that folder's.
            upstream = _lineage_of_path(Path(init_from), store)
            upstream.origin = lin.origin
            upstream.model["finetuned_from"] = init_from
            return upstream
        pretrain = None if scratch else _pretrain_run_of(workdir, store)
        task_name = run.data.tags.get(TASK_TAG, "")
        paths = Workdir(workdir) if workdir else None
        # The run records the folder it wrote; older runs did not, and wrote <task>[-scratch].
        folder = Path(run.data.tags[RESULTS_TAG]) if RESULTS_TAG in run.data.tags else (
            paths.task(task_name, scratch) if paths else None)
        lin.model = {"kind": "finetune", "task": task_name, "arm": "scratch" if scratch else "pretrained",
                     "path": str(folder) if folder else None,
                     "finetuned_from": "random weights" if scratch else (str(paths.export) if paths else None),
                     "pretrain_run": _run_summary(pretrain) if pretrain else None}
        if scratch:  # no pretrained model: only the tokenizer (and what it was trained on) came before it
            _fill_upstream(lin, workdir, run, store, UPSTREAM["tokenizer"])
            return lin
        if pretrain is None:
            lin.warnings.append(f"no pretrain run found for workdir {workdir}: the hashes below are the workdir's "
                                "current files, not what the model was trained on")
        _fill_upstream(lin, workdir, pretrain or run, store, ALL_UPSTREAM)
        return lin
    if stage == "pretrain":
        export = Workdir(workdir).export if workdir else None
        # The stage also logs the export as the run's `export` artifacts: that copy stays with the run.
        lin.model = {"kind": "pretrain", "path": str(export) if export else None,
                     "artifacts": f"{run.info.artifact_uri}/export", "pretrain_run": _run_summary(run)}
        id_file = Workdir(workdir).run_id_file("pretrain") if workdir else None
        if id_file is not None and id_file.is_file() and id_file.read_text().strip() != run.info.run_id:
            lin.warnings.append(f"{export} now holds the model of run {id_file.read_text().strip()[:SHORT_ID]}, not "
                                f"this run's: its own export is in the run's artifacts ({lin.model['artifacts']})")
        _fill_upstream(lin, workdir, run, store, ALL_UPSTREAM)
        return lin
    if stage in UPSTREAM:
        _fill_upstream(lin, workdir, run, store, UPSTREAM[stage])
        return lin
    raise RunsError(f"run {run.info.run_id[:SHORT_ID]} has stage tag {stage!r}: lineage is for prep, tokenizer, "
                    "shard, pretrain and finetune runs")


def _pretrain_run_of(workdir: Path | None, store: Store | None) -> Any:
    """The workdir's pretrain run: the id the stage left in pretrain/mlflow_run_id, else the newest by tag."""
    if workdir is None:
        return None
    id_file = Workdir(workdir).run_id_file("pretrain")
    if id_file.is_file():
        run = _run_by_id(store, id_file.read_text().strip())
        if run is not None:
            return run
    return _newest_run(store, [f"tags.{STAGE_TAG} = 'pretrain'", f"tags.{WORKDIR_TAG} = {_quote(workdir)}"])


def _lineage_of_path(path: Path, store: Store | None) -> Lineage:
    lin = Lineage(origin={"kind": "path", "path": str(path)})
    checkpoint: Path | None = None
    workdir: Path | None = None
    task: str | None = None
    if (path / "config.json").is_file():  # an export folder
        lin.model = {"kind": "export", "path": str(path)}
        pointer = _read_json(path / "scratchgpt_checkpoint.json")
        if pointer and pointer.get("checkpoint"):
            checkpoint = Path(pointer["checkpoint"])
            lin.model.update(checkpoint=str(checkpoint), step=pointer.get("step"))
        elif path.parent.parent.name == "finetune":  # <workdir>/finetune/<task>/export
            workdir, task = path.parents[2], path.parent.name
            lin.model["kind"] = "finetune export"
        elif path.name == "export" and path.parent.name == "pretrain":
            workdir = path.parents[1]
        if (path / "tokenizer.json").is_file():
            from dataprep.tokenizer import tokenizer_sha256

            lin.model["tokenizer_sha256"] = tokenizer_sha256(path / "tokenizer.json")
    elif (path / "latest").is_file():  # a checkpoints folder
        checkpoint = path / (path / "latest").read_text().strip()
        lin.model = {"kind": "checkpoint", "path": str(checkpoint)}
    elif (path / "scratchgpt.json").is_file():  # one checkpoint
        checkpoint = path
        lin.model = {"kind": "checkpoint", "path": str(checkpoint)}
    elif any((path / name).is_dir() for name in ("prep", "tokenizer", "shards", "pretrain")):
        workdir = path
        export = Workdir(path).export
        lin.model = {"kind": "workdir", "path": str(export) if export.is_dir() else None}
    else:
        raise RunsError(f"{path}: not an export folder (config.json), a checkpoint folder (latest or scratchgpt.json) "
                        "or a workdir (prep/, tokenizer/, shards/ or pretrain/)")
    expected: dict[str, str] = {}
    if checkpoint is not None:
        meta = _read_json(checkpoint / "scratchgpt.json") or {}
        lin.model.setdefault("step", meta.get("step"))
        expected = {k: meta[k] for k in ("manifest_sha256", "tokenizer_sha256") if meta.get(k)}
        if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.name == "pretrain":
            workdir = checkpoint.parents[2]
        if not meta:
            lin.warnings.append(f"checkpoint {checkpoint} has no readable scratchgpt.json: its data hashes are unknown")
    if store is None and workdir is not None and Workdir(workdir).mlflow_db.is_file():
        store = open_store(f"sqlite:///{Workdir(workdir).mlflow_db}", None)
    if store is None:
        lin.warnings.append("no MLflow store to link runs from (none at <workdir>/mlflow.db): pass the CONFIG, "
                            "--tracking-uri or MLFLOW_TRACKING_URI")
    run = None
    if task is not None:
        run = _newest_run(store, [f"tags.{RESULTS_TAG} = {_quote(path.parent)}"])
        if run is None:  # a run from before the results tag: its stage is named after the task
            base = task.removesuffix("-scratch")
            run = _newest_run(store, [f"tags.{STAGE_TAG} = 'finetune/{base}'",
                                      f"tags.{WORKDIR_TAG} = {_quote(workdir)}"])
        lin.model["finetune_run"] = _run_summary(run) if run else None
        if run is not None:
            arm = run.data.tags.get(ARM_TAG) or ("scratch" if task.endswith("-scratch") else "pretrained")
            lin.model["arm"] = arm
            if arm == "scratch":
                lin.model["finetuned_from"] = "random weights"
    pretrain = _pretrain_run_of(workdir, store)
    if pretrain is not None:
        lin.model["pretrain_run"] = _run_summary(pretrain)
    source = pretrain
    if expected:  # the checkpoint's own record wins over a run's tags
        source = _Recorded(expected, pretrain)
    _fill_upstream(lin, workdir, source, store, ALL_UPSTREAM)
    return lin


@dataclass
class _Recorded:
    """The hashes a checkpoint recorded, in the shape of a run's tags and params."""

    hashes: dict[str, str]
    run: Any

    @property
    def tags(self) -> dict[str, str]:
        tags = dict(self.run.data.tags) if self.run is not None else {}
        tags[PRETRAIN_MANIFEST_TAG] = self.hashes.get("manifest_sha256", tags.get(PRETRAIN_MANIFEST_TAG, ""))
        tags[TOKENIZER_TAG] = self.hashes.get("tokenizer_sha256", tags.get(TOKENIZER_TAG, ""))
        return tags

    @property
    def params(self) -> dict[str, str]:
        return dict(self.run.data.params) if self.run is not None else {}


def _tags_params(source: Any) -> tuple[dict[str, str], dict[str, str]]:
    if source is None:
        return {}, {}
    if isinstance(source, _Recorded):
        return source.tags, source.params
    return dict(source.data.tags), dict(source.data.params)


def _fill_upstream(lin: Lineage, workdir: Path | None, source: Any, store: Store | None,
                   sections: tuple[str, ...]) -> None:
    """Tokenizer, shards, prep and raw inputs for a model (or an upstream run) recorded by `source`."""
    tags, params = _tags_params(source)
    stage = tags.get(STAGE_TAG, "")
    lin.origin.setdefault("workdir", str(workdir) if workdir else None)
    if workdir is not None and not workdir.is_dir():
        lin.warnings.append(f"workdir {workdir} is not on this machine: showing what the MLflow runs recorded")
        workdir = None
    expected_manifest = tags.get(PRETRAIN_MANIFEST_TAG) or (tags.get(SHARD_MANIFEST_TAG) if stage == "shard" else "")
    if "shard" in sections:
        _fill_shards(lin, workdir, expected_manifest, store)
    expected_tokenizer = tags.get(TOKENIZER_TAG) or lin.shards.get("tokenizer_sha256", "")
    if "tokenizer" in sections:
        _fill_tokenizer(lin, workdir, expected_tokenizer, store)
    _fill_prep(lin, workdir, tags, store)
    _fill_inputs(lin, params)
    _fill_markers(lin, workdir)


def _fill_shards(lin: Lineage, workdir: Path | None, expected: str, store: Store | None) -> None:
    from dataprep.shards import file_sha256

    section: dict[str, Any] = {"recorded_sha256": expected or None}
    path = Workdir(workdir).manifest if workdir else None
    if path is not None and path.is_file():
        section.update(path=str(path), sha256=file_sha256(path))
        manifest = _read_json(path) or {}
        section["tokenizer_sha256"] = manifest.get("tokenizer_sha256", "")
        section["vocab_size"] = manifest.get("vocab_size")
        section["splits"] = {name: {"tokens": split.get("tokens"), "docs": split.get("docs"),
                                    "bytes": split.get("bytes"), "shards": len(split.get("shards", []))}
                             for name, split in manifest.get("splits", {}).items()}
        if expected and section["sha256"] != expected:
            lin.warnings.append(f"{path} (sha256 {section['sha256'][:12]}) is not the manifest the model was "
                                f"trained on ({expected[:12]}): the shards were rebuilt since; the counts below are "
                                "from the shard run that wrote the recorded one, where the store has it")
    elif path is not None:
        lin.warnings.append(f"{path} is missing")
    wanted = expected or section.get("sha256")
    run = _newest_run(store, [f"tags.{SHARD_MANIFEST_TAG} = {_quote(wanted)}"]) if wanted else None
    if run is not None:
        section["run"] = _run_summary(run)
        if "splits" not in section or (expected and section.get("sha256") != expected):
            metrics = run.data.metrics
            section["splits"] = {s: {k: _int(metrics.get(f"{s}_{k}")) for k in ("tokens", "docs", "bytes", "shards")}
                                 for s in ("train", "val")}
            section["tokenizer_sha256"] = run.data.tags.get(TOKENIZER_TAG, "")
    lin.shards = section


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _fill_tokenizer(lin: Lineage, workdir: Path | None, expected: str, store: Store | None) -> None:
    from dataprep.tokenizer import tokenizer_sha256

    section: dict[str, Any] = {"recorded_sha256": expected or None}
    path = Workdir(workdir).tokenizer / "tokenizer.json" if workdir else None
    if path is not None and path.is_file():
        section.update(path=str(path), sha256=tokenizer_sha256(path))
        if expected and section["sha256"] != expected:
            lin.warnings.append(f"{path} (sha256 {section['sha256'][:12]}) is not the tokenizer the model was trained "
                                f"with ({expected[:12]}): it was retrained since")
    elif path is not None:
        lin.warnings.append(f"{path} is missing")
    in_model = lin.model.get("tokenizer_sha256")
    if in_model and expected and in_model != expected:
        lin.warnings.append(f"the tokenizer.json in {lin.model.get('path')} (sha256 {in_model[:12]}) differs from the "
                            f"one the model was trained with ({expected[:12]})")
    if lin.shards.get("vocab_size"):
        section["vocab_size"] = lin.shards["vocab_size"]
    wanted = expected or section.get("sha256")
    run = (_newest_run(store, [f"tags.{STAGE_TAG} = 'tokenizer'", f"tags.{TOKENIZER_TAG} = {_quote(wanted)}"])
           if wanted else None)
    if run is not None:
        section["run"] = _run_summary(run)
        section.setdefault("vocab_size", _int(run.data.metrics.get("vocab_size")))
        section["bytes_per_token"] = run.data.metrics.get("bytes_per_token")
    lin.tokenizer = section


def _fill_prep(lin: Lineage, workdir: Path | None, tags: dict[str, str], store: Store | None) -> None:
    section: dict[str, Any] = {}
    stats_path = Workdir(workdir).prep_stats if workdir else None
    stats = _read_json(stats_path) if stats_path is not None else None
    run = None
    if stats is not None:
        section["path"] = str(stats_path)
        counts = stats
        run = _run_by_id(store, stats.get("mlflow_run_id", ""))
        section["input_files"] = stats.get("inputs", [])
    else:
        recorded_workdir = tags.get(WORKDIR_TAG)
        if recorded_workdir:
            run = _newest_run(store, [f"tags.{STAGE_TAG} = 'prep'", f"tags.{WORKDIR_TAG} = {_quote(recorded_workdir)}"])
        counts = {k: _int(v) for k, v in run.data.metrics.items()} if run is not None else {}
        if stats_path is not None:
            lin.warnings.append(f"{stats_path} is missing or unreadable"
                                + ("; prep counts are from the prep run" if run is not None else ""))
    if run is not None:
        section["run"] = _run_summary(run)
        section["data.inputs"] = run.data.params.get("data.inputs")
        section["data.sources"] = run.data.params.get("data.sources")
    if counts:
        section.update({k: counts.get(k) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")})
        section["dropped"] = {k.removeprefix("dropped_"): v for k, v in counts.items()
                              if k.startswith("dropped_") and isinstance(v, int)}
    lin.prep = section


def _fill_inputs(lin: Lineage, params: dict[str, str]) -> None:
    configured = params.get("data.inputs") or lin.prep.get("data.inputs")
    sources = params.get("data.sources") or lin.prep.get("data.sources")
    files = []
    for name in lin.prep.get("input_files", []):
        file = Path(name)
        files.append({"path": name, "exists": file.is_file(), "bytes": file.stat().st_size if file.is_file() else None})
    lin.inputs = {"data.inputs": configured, "files": files}
    if sources not in (None, "", "[]", "None"):  # several sources: data.inputs is only its unused default
        lin.inputs = {"data.sources": sources, "files": files}


def _fill_markers(lin: Lineage, workdir: Path | None) -> None:
    if workdir is None:
        return
    finished: list[tuple[str, float]] = []
    for stage in MARKER_STAGES:
        marker = _read_json(Workdir(workdir).marker(stage))
        if marker is None:
            continue
        when = marker.get("finished")
        lin.markers[stage] = {"hash": marker.get("hash"), "finished": fmt_time(int(when * 1000)) if when else None}
        if when:
            finished.append((stage, when))
    for (up, up_when), (down, down_when) in zip(finished, finished[1:], strict=False):
        if up_when > down_when:
            lin.warnings.append(f"the {up} stage finished after the {down} stage in {workdir}: {down} was built from "
                                f"an older {up} output (run `scratchgpt run` to bring it up to date)")


def format_lineage(lin: Lineage) -> str:
    """The lineage as indented text, model first, raw inputs last."""
    out: list[str] = []

    def head(title: str, text: str) -> None:
        out.append(f"{title:<10} {text}")

    def more(text: str) -> None:
        out.append(f"{'':<10} {text}")

    def run_line(run: dict[str, Any] | None, what: str) -> None:
        if run:
            more(f"{what} run {run['run_id'][:SHORT_ID]} ({run['name']}, {run['status']})")

    origin = lin.origin
    if origin["kind"] == "run":
        head("lineage", f"of run {origin['run_id']} ({origin['name']}, stage {origin['stage']}, {origin['status']})")
    else:
        head("lineage", f"of {origin['path']}")
    if lin.model:
        model = lin.model
        head("model", f"{model.get('kind')}: {model.get('path') or '-'}")
        if model.get("artifacts"):
            more(f"artifacts {model['artifacts']}")
        if model.get("tokenizer_sha256"):
            more(f"its tokenizer.json: sha256 {model['tokenizer_sha256']}")
        if model.get("step") is not None:
            more(f"step {model['step']}, checkpoint {model.get('checkpoint', model.get('path'))}")
        if model.get("arm") == "scratch":
            more("trained from random weights (the no-pretraining baseline)")
        elif model.get("finetuned_from"):
            more(f"fine-tuned from {model['finetuned_from']}")
        run_line(model.get("finetune_run"), "finetune")
        run_line(model.get("pretrain_run"), "pretrain")
    if lin.tokenizer:
        tok = lin.tokenizer
        head("tokenizer", tok.get("path") or "(file not here)")
        more(f"sha256 {_hash_status(tok)}")
        extra = [f"vocab {tok['vocab_size']}" if tok.get("vocab_size") else "",
                 f"{tok['bytes_per_token']:.3f} bytes/token" if tok.get("bytes_per_token") else ""]
        if any(extra):
            more(", ".join(e for e in extra if e))
        run_line(tok.get("run"), "tokenizer")
    if lin.shards:
        shards = lin.shards
        head("shards", shards.get("path") or "(manifest not here)")
        more(f"sha256 {_hash_status(shards)}")
        for name, split in (shards.get("splits") or {}).items():
            more(f"{name}: {_num(split.get('tokens'))} tokens, {_num(split.get('docs'))} docs, "
                 f"{_num(split.get('bytes'))} bytes in {_num(split.get('shards'))} shard(s)")
        run_line(shards.get("run"), "shard")
    prep = lin.prep
    head("prep", prep.get("path") or "(stats.json not here)")
    if prep.get("docs_in") is not None:
        more(f"docs in {_num(prep['docs_in'])}, out {_num(prep.get('docs_out'))}; "
             f"bytes in {_num(prep.get('bytes_in'))}, out {_num(prep.get('bytes_out'))}")
        dropped = prep.get("dropped") or {}
        if dropped:
            more("dropped: " + ", ".join(f"{k} {_num(v)}" for k, v in dropped.items()))
    else:
        more("no prep counts found")
    run_line(prep.get("run"), "prep")
    if "data.sources" in lin.inputs:
        head("inputs", f"data.sources = {lin.inputs['data.sources']}")
    else:
        head("inputs", f"data.inputs = {lin.inputs.get('data.inputs') or '(not recorded)'}")
    for file in lin.inputs.get("files", []):
        state = f"{_num(file['bytes'])} bytes" if file["exists"] else "MISSING"
        more(f"{file['path']} ({state})")
    if lin.markers:
        head("markers", ", ".join(f"{stage} {m['finished'] or '?'}" for stage, m in lin.markers.items()) + " (UTC)")
    for warning in lin.warnings:
        out.append(f"warning: {warning}")
    return "\n".join(out)


def _hash_status(section: dict[str, Any]) -> str:
    now, recorded = section.get("sha256"), section.get("recorded_sha256")
    if now and recorded:
        return f"{now} (matches the run's record)" if now == recorded else f"{now} (the run recorded {recorded})"
    if recorded:
        return f"{recorded} (as recorded; file not checked)"
    return f"{now} (no record to check against)" if now else "unknown"


def _num(value: Any) -> str:
    return "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
