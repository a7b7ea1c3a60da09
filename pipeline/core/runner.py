"""The stage runner: everything around a stage's work, done once for every stage.

    run_stage(cfg, name)
      1. complete?       the marker's identity is today's (config, inputs, upstream outputs) and the outputs are
                         still there (the stage's verify hook): skip
      2. reachable       a tracking server that does not answer stops here (rank 0), before any waiting
      3. lock + check    <workdir>/scratchgpt.lock (rank 0; re-entrant inside `scratchgpt run`), then the stage's
                         own refusals (bad input names, a schedule that cannot continue) while earlier outputs
                         are still whole
      4. clean or resume same identity as the interrupted run: resume; another (or --force): remove the outputs
      5. MLflow run      the stage's sections as params, its tags; an interrupted stage reopens its run
      6. the work        spec.entry(ctx) -> summary (raises StageStopped to stop for a requeue)
      7. marker          identity + parts + output digest + summary (rank 0), then the summary line

`guard(label, fn)` is the one error path of every command: an error the
project raises on purpose (`ScratchgptError`) or a full disk prints one line,
`scratchgpt <stage>: <what>`, and exits 2; anything else is a bug and keeps its
traceback (exit 1), also written to `<workdir>/<stage>/error.log`. Under
torchrun or srun only rank 0 prints the line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataprep.errors import DiskFullError, ScratchgptError
from pipeline.config import Config
from pipeline.core import identity, tracking
from pipeline.core.lock import workdir_lock
from pipeline.core.stages import STAGES, StageSpec
from pipeline.core.warnings_filter import quiet_library_warnings
from pipeline.core.workdir import Workdir, workdir_of
from training.launch import DistEnv


class StageStopped(Exception):  # noqa: N818 - control flow, not an error
    """Raised by an entry that stopped on purpose before finishing (a signal): no marker, exit 0, resume later."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass
class StageContext:
    """What an entry gets: the config, its paths, who it is, and the stage's MLflow run (rank 0 only)."""

    cfg: Config
    name: str
    paths: Workdir
    dist: DistEnv
    run: Any = None  # the active MLflow run on rank 0, None on the other ranks
    resumed: bool = False  # an interrupted run of the same identity is being continued
    warnings: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def warn(self, text: str) -> None:
        """A warning the summary repeats at the end, where it is seen; said once, however often it is raised (every
        arm and seed of a task, say)."""
        if text in self.warnings:
            return
        self.warnings.append(text)
        if self.is_main:
            print(f"[{self.name}] warning: {text}", file=sys.stderr, flush=True)


RANK_ERROR_GRACE_S = 10.0  # how long a rank other than 0 leaves rank 0 to report an error first
_current: list[str] = []  # the stage running now, innermost last: the label of an error's line


def print_summary(name: str, summary: dict[str, Any], seconds: float) -> None:
    print(f"\n[{name}] done in {seconds:.1f} s")
    for key, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
            print(f"  {key}: {inner}")
        elif isinstance(value, float):
            print(f"  {key}: {value:.4g}")
        else:
            print(f"  {key}: {value}")


def _write_json(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str))
    os.replace(tmp, path)  # atomic: a marker is never half-written


def clean_outputs(cfg: Config, spec: StageSpec) -> None:
    for out in spec.outputs:
        shutil.rmtree(Path(cfg.workdir) / out, ignore_errors=True)


@dataclass
class Plan:
    """What the runner will do with a stage's earlier outputs, decided before anything is touched."""

    resumed: bool  # continue them (an interrupted run of this identity, or outputs the stage can carry on from)
    why: str = ""  # what changed since the earlier run's marker (printed whether it continues or runs again)


def decide(cfg: Config, spec: StageSpec, ident: identity.Identity, force: bool) -> Plan:
    """Continue or start afresh (rank 0), reading the markers only."""
    paths = workdir_of(cfg)
    marker = identity.read_marker(cfg, spec.name)
    started = identity.read_json(paths.started(spec.name))
    previous = marker or started
    interrupted = started is not None and started.get("hash") == ident.hash and marker is None
    continued = previous is not None and previous.get("resume", previous.get("hash")) == ident.resume
    why = ""
    if previous is not None and previous.get("hash") != ident.hash:
        why = identity.explain(previous, ident, spec.sections)
    return Plan(resumed=not force and (interrupted or continued), why=why)


def prepare(cfg: Config, spec: StageSpec, ident: identity.Identity, plan: Plan) -> None:
    """Clean or keep the earlier outputs as `plan` says (rank 0), and mark the stage started."""
    paths = workdir_of(cfg)
    if plan.why:
        print(f"[{spec.name}] {'continuing' if plan.resumed else 'running again'}: {plan.why}", flush=True)
    if not plan.resumed:  # also when the markers were deleted by hand: nothing of an earlier run may survive
        clean_outputs(cfg, spec)
    paths.marker(spec.name).unlink(missing_ok=True)
    _write_json(paths.started(spec.name), {"stage": spec.name, "hash": ident.hash, "resume": ident.resume,
                                            "parts": ident.parts, "at": time.time()})


def outputs_problem(cfg: Config, spec: StageSpec, marker: dict[str, Any]) -> str:
    """Why a stage marked complete cannot be trusted as it is (its outputs went missing or were changed), or ""."""
    verify = spec.hook("verify")
    if verify is None:
        return ""
    try:
        return verify(cfg, marker) or ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ScratchgptError) as exc:  # a hand-edited file
        return f"its outputs are missing or unreadable since it finished ({exc})"


@contextlib.contextmanager
def stage_tracking(ctx: StageContext, spec: StageSpec, ident: identity.Identity) -> Iterator[Any]:
    """The stage's MLflow run on rank 0 (None elsewhere); a resumed stage reopens the run it started."""
    if not ctx.is_main:
        yield None
        return
    import mlflow

    id_file = ctx.paths.run_id_file(spec.name)
    if ctx.resumed and id_file.is_file():
        run_id = id_file.read_text().strip()
        tracking.use_tracking(ctx.cfg)
        try:
            mlflow.MlflowClient().get_run(run_id)
        except Exception:  # the store was reset or moved: start a new run
            run_id = ""
        if run_id:
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
                yield run
            return
    tags = {tracking.IDENTITY_TAG: ident.hash, **tracking.upstream_tags(ident.parts)}
    with tracking.stage_run(ctx.cfg, spec.name, sections=spec.sections, tags=tags) as run:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id)
        yield run


def is_done(cfg: Config, name: str) -> bool:
    """Complete for today's identity, with its outputs still there: `run_stage` would skip it."""
    marker = identity.read_marker(cfg, name)
    return (marker is not None and marker.get("hash") == identity.compute(cfg, name).hash
            and not outputs_problem(cfg, STAGES[name], marker))


def run_stage(cfg: Config, name: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless its marker says it is done with today's config, inputs and upstream outputs."""
    spec = STAGES[name]
    dist = DistEnv.from_config(cfg)
    ident = identity.compute(cfg, name)
    marker = identity.read_marker(cfg, name)
    redo = "--force" if force else ""
    if not force and marker is not None and marker.get("hash") == ident.hash:
        problem = outputs_problem(cfg, spec, marker)
        if not problem:
            if dist.is_main:
                print(f"[{name}] complete, skipped (delete {Path(cfg.workdir) / name} or pass --force to redo)")
            return None
        if dist.is_main:
            print(f"[{name}] running again: {problem}", flush=True)
        if not spec.repair_resumes:  # broken outputs are not continued, unless the stage can
            force, redo = True, f"a redo ({problem})"
    check_upstream(cfg, spec)
    if force and dist.is_distributed:
        raise ScratchgptError(f"{redo} with {dist.world_size} processes: other ranks could read what rank 0 "
                              f"removes; run `scratchgpt {name} CONFIG --force` once on one process or delete "
                              f"{Path(cfg.workdir) / name}, then launch")
    if dist.is_main:  # the other ranks would race rank 0's clean-up of the same folder
        check_writable(workdir_of(cfg).stage(name), name)
        tracking.check_reachable(tracking.tracking_uri(cfg))  # before anything of an earlier run is removed
    _current.append(name)
    try:
        lock = workdir_lock(workdir_of(cfg).lock, name) if dist.is_main else contextlib.nullcontext()
        with lock, quiet_library_warnings():
            return _run_locked(cfg, spec, ident, dist, force)
    finally:
        _current.pop()


def check_writable(folder: Path, name: str) -> None:
    """Fail before any work when the stage's folder cannot be created or written."""
    from pipeline.config import ConfigError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"  # per process: every rank of a launch checks at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"`workdir`: cannot write the {name} output folder {folder}: {exc.strerror or exc}") from None


class UpstreamNotComplete(ScratchgptError):
    """A stage before this one ran in this workdir, but not with today's config and inputs."""


def check_upstream(cfg: Config, spec: StageSpec) -> None:
    """Refuse to build on an upstream stage whose marker is stale (a workdir with no markers is left to the stage:
    its own check names the file it is missing)."""
    for up in spec.upstream:
        if spec.name == "finetune" and cfg.finetune.init_from:
            continue  # it starts from the folder named there, not from this workdir's pretraining
        marker = identity.read_marker(cfg, up)
        if marker is None and workdir_of(cfg).started(up).is_file():
            raise UpstreamNotComplete(f"the {up} stage has not finished (it was interrupted, or is running now)",
                                      hint=f"run `scratchgpt {up} CONFIG` first (it resumes), or `scratchgpt run`")
        if marker is not None and marker.get("hash") != identity.compute(cfg, up).hash:
            why = identity.explain(marker, identity.compute(cfg, up), STAGES[up].sections)
            raise UpstreamNotComplete(f"the {up} stage is out of date ({why})",
                                      hint=f"run `scratchgpt {up} CONFIG` first, or `scratchgpt run CONFIG`")


def _run_locked(cfg: Config, spec: StageSpec, ident: identity.Identity, dist: DistEnv,
                force: bool) -> dict[str, Any] | None:
    started = time.time()
    # Rank 0 cleans before it joins the process group; the other ranks read their own outputs only after joining.
    resumed = False
    if dist.is_main:
        plan = decide(cfg, spec, ident, force)
        check = spec.hook("check")
        if check is not None:  # refuse what the stage would refuse, while the earlier outputs are still whole
            check(cfg, plan.resumed)
        prepare(cfg, spec, ident, plan)
        resumed = plan.resumed
    ctx = StageContext(cfg=cfg, name=spec.name, paths=workdir_of(cfg), dist=dist, resumed=resumed)
    if dist.is_main:
        print(f"[{spec.name}] {'resuming' if resumed else 'starting'}: {spec.help}", flush=True)
    entry = spec.hook("entry")
    assert entry is not None
    with stage_tracking(ctx, spec, ident) as run:
        ctx.run = run
        try:
            summary = entry(ctx)
        except StageStopped as stop:
            if run is not None:
                import mlflow

                mlflow.set_tag("stopped_by", "signal")
                mlflow.end_run("KILLED")  # a resumed stage reopens it and finishes it
            if dist.is_main:
                print(f"[{spec.name}] {stop}", flush=True)
            sys.stdout.flush()
            raise SystemExit(0) from None
        if ctx.warnings:
            summary = {**summary, "warnings": list(ctx.warnings)}
    if dist.is_main:
        write_marker(cfg, spec.name, summary, started, ident, ctx.warnings)
        print_summary(spec.name, {k: v for k, v in summary.items() if k != "warnings"}, time.time() - started)
        for text in ctx.warnings:
            print(f"  warning: {text}")
    return summary


def stage_main(name: str, config: Path, overrides: list[str] | tuple[str, ...] = (), force: bool = False) -> int:
    """`scratchgpt <stage> CONFIG` in this process, with the one error path: the exit code."""
    from pipeline.config import load_config

    loaded: list[Config] = []

    def work() -> None:
        loaded.append(load_config(config, list(overrides)))
        run_stage(loaded[0], name, force=force)

    return guard(name, work, lambda: loaded[0] if loaded else None)


def write_marker(cfg: Config, name: str, summary: dict[str, Any], started: float,
                 ident: identity.Identity | None = None, warnings: list[str] | None = None) -> None:
    """Mark `name` complete for today's identity (computed when not given), with its output digest and summary."""
    spec = STAGES[name]
    ident = ident or identity.compute(cfg, name)
    digest_fn = spec.hook("digest")
    try:
        digest = digest_fn(cfg) if digest_fn else ""
    except (OSError, ValueError, KeyError):  # outputs not all there (a marker written by hand): no digest
        digest = ""
    paths = workdir_of(cfg)
    body = {"stage": name, "hash": ident.hash, "resume": ident.resume, "parts": ident.parts, "digest": digest,
            "started": started, "finished": time.time(), "summary": summary, "warnings": warnings or []}
    _write_json(paths.marker(name), body)
    paths.started(name).unlink(missing_ok=True)


# ---------------------------------------------------------------- the one error path


def error_line(label: str, exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    line = f"scratchgpt {label}: {message}"
    hint = getattr(exc, "hint", "")
    return f"{line}\n  hint: {hint}" if hint else line


def _out_of_space(exc: BaseException) -> OSError | None:
    """The ENOSPC or EDQUOT (quota) error behind `exc`, also when a library wrapped it (torch.save, DeepSpeed)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return OSError(errno.ENOSPC, "no space left on device")
        exc = exc.__cause__ or exc.__context__
    return None


def _disk_full(exc: OSError, folder: Path | None) -> DiskFullError:
    where = exc.filename or (f"a file under {folder}" if folder else "a file under the workdir")
    return DiskFullError(f"disk full: cannot write {where} ({exc.strerror or 'no space left on device'})")


def _error_log(cfg: Config | None, label: str) -> Path | None:
    """<workdir>/<stage>/error.log (rank 0), error.rank<N>.log for the other ranks: each keeps its own cause."""
    if cfg is None:
        return None
    stage = label.split(" ")[0].split("/")[0]
    rank = DistEnv.from_environ().rank if not _is_main_process() else 0
    name = "error.log" if rank == 0 else f"error.rank{rank}.log"
    return Path(cfg.workdir) / (stage if stage in STAGES else "") / name


def guard(label: str, fn: Callable[[], int | None], cfg_of: Callable[[], Config | None] = lambda: None) -> int:
    """Run a command; map what it raises to one line and an exit code (2: the user's to fix, 1: a bug)."""
    is_main = _is_main_process()
    try:
        code = fn()
        return 0 if code is None else code
    except KeyboardInterrupt:
        print(f"scratchgpt {label}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - this is the one place that decides
        where = _current[-1] if _current else label
        full = _out_of_space(exc)
        if full is not None:
            cfg = cfg_of()
            exc = _disk_full(full, Path(cfg.workdir) / where.split("/")[0] if cfg is not None else None)
        if isinstance(exc, ScratchgptError):
            if not is_main:
                # Usually every rank meets the same error: rank 0 prints it and exits, and the launcher (torchrun,
                # srun --kill-on-bad-exit) stops this rank while it waits. Met by this rank alone, it is said here.
                time.sleep(RANK_ERROR_GRACE_S)
                where = f"{where} (rank {DistEnv.from_environ().rank})"
            print(error_line(where, exc), file=sys.stderr, flush=True)
            return 2
        text = traceback.format_exc()
        log = _error_log(cfg_of(), where)
        if log is not None:
            with contextlib.suppress(OSError):
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(text)
        print(text, file=sys.stderr, end="")
        tail = f"; the traceback is also in {log}" if log is not None and log.is_file() else ""
        print(f"scratchgpt {where}: unexpected error ({type(exc).__name__}), a bug: please report it{tail}",
              file=sys.stderr, flush=True)
        return 1


def _is_main_process() -> bool:
    """Rank 0 (or a single process), from the one reader of the distributed environment; True when unreadable."""
    try:
        return DistEnv.from_environ().is_main
    except ScratchgptError:
        return True
