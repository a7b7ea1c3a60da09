"""The finetune stage: each task in `finetune.tasks` from the pretrained export, one MLflow child run per task.

Outputs per task under `<workdir>/finetune/<task>/` (`<task>-scratch` for the
no-pretraining baseline): `export/` (a Hugging Face folder of the best
weights), `metrics.json`, and for classification `confusion.json`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import BUILTIN_PREFIX, Config, ConfigError
from pipeline.core.runner import StageContext
from pipeline.core.tracking import ARM_TAG, KIND_TAG, RESULTS_TAG, SEED_TAG, TASK_TAG, stage_run
from pipeline.core.workdir import workdir_of


def init_folder(cfg: Config) -> Path:
    return Path(cfg.finetune.init_from) if cfg.finetune.init_from else workdir_of(cfg).export


def resolve_builtin_files(cfg: Config, task: Any) -> Any:
    """The task with `builtin:python-docs-kind/{train,eval}` replaced by files written under the workdir."""
    if not (task.train.startswith(BUILTIN_PREFIX) or task.eval.startswith(BUILTIN_PREFIX)):
        return task
    from dataprep.builtin_corpus import NAME, materialise, write_kind_task

    paths = workdir_of(cfg)
    corpus = materialise(NAME, paths.prep_input, cfg.data.text_key, cfg.data.id_key)
    files = write_kind_task(corpus, paths.builtin_tasks / "python-docs-kind",
                            text_key=cfg.data.text_key, id_key=cfg.data.id_key)
    update = {key: str(files[getattr(task, key).rsplit("/", 1)[1]]) for key in ("train", "eval")
              if getattr(task, key).startswith(BUILTIN_PREFIX)}
    return task.model_copy(update=update)


def _tokenizer(cfg: Config, init: Path) -> Any:
    from tokenizers import Tokenizer

    own = workdir_of(cfg).tokenizer
    for path in (init / "tokenizer.json", own / "tokenizer.json"):
        if path.is_file():
            return Tokenizer.from_file(str(path))
    raise ConfigError(f"no tokenizer.json in {init} or {own}: run `scratchgpt tokenizer`")


def _base_model(cfg: Config, init: Path, scratch: bool, vocab_size: int) -> tuple[Any, Any]:
    """(GPT, GPTConfig): the pretrained export, or the configured shape with fresh weights."""
    from training.export import load_gpt
    from training.model import GPT, GPTConfig

    if not scratch:
        if not (init / "config.json").is_file():
            raise ConfigError(
                f"no pretrained model in {init}: run `scratchgpt pretrain` first, set finetune.init_from, "
                "or pass --from-scratch"
            )
        return load_gpt(init)
    config = GPTConfig.from_model_config(cfg.model, cfg.model.vocab_size or vocab_size)
    return GPT(config), config


def input_files(cfg: Config) -> list[str]:
    """The task files (built-in ones are named as they are), a `finetune.init_from` export and the user's own
    modules (`custom_import` .py files): the identity."""
    files = [value for task in cfg.finetune.tasks for value in (task.train, task.eval)]
    files += [str(Path(m).resolve()) for m in cfg.custom_import if m.endswith(".py")]
    if cfg.finetune.init_from:
        init = Path(cfg.finetune.init_from)
        files += [str(p) for p in sorted(init.glob("*")) if p.is_file()]
    return list(dict.fromkeys(files))


def arms(cfg: Config, task: Any) -> list[bool]:
    """The arms this run fine-tunes `task` in, as from_scratch flags: both with finetune.vs_scratch."""
    if cfg.finetune.vs_scratch:
        return [False, True]
    return [cfg.finetune.from_scratch or task.from_scratch]


def seeds(cfg: Config, task: Any) -> list[int]:
    first = cfg.train.seed if task.seed is None else task.seed
    return [first + k for k in range(cfg.finetune.seeds)]


def verify(cfg: Config, marker: dict[str, Any]) -> str:
    """Every task, arm and seed still has its results (a deleted result folder is trained again)."""
    for task in cfg.finetune.tasks:
        for seed in seeds(cfg, task):
            for scratch in arms(cfg, task):
                metrics = result_dir(cfg, task, scratch, seed) / "metrics.json"
                if not metrics.is_file():
                    return f"{metrics} is missing"
    return ""


def result_dir(cfg: Config, task: Any, scratch: bool, seed: int) -> Path:
    """The first seed's results sit in finetune/<task>[-scratch]; the others beside them, named by seed."""
    first = seeds(cfg, task)[0]
    return workdir_of(cfg).task(task.name, scratch, None if seed == first else seed)


@dataclass
class TaskRun:
    """One arm and seed of a task, ready to train: what the stage (and bench/finetune_step_time.py) works with."""

    task: Any  # as configured, with built-in files resolved (the finetuner's own copy has budget.steps)
    budget: Any  # training.finetune.Budget: this arm's steps and why
    init: Path
    goal: Any  # the task's training.objectives.Objective
    prepared: Any
    gpt_config: Any
    eot: int
    finetuner: Any  # training.finetune.Finetuner
    examples: tuple[int, int]  # train, eval
    empty_skipped: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))  # train, eval: "file:line"
    # of the rows skipped for empty text


def build_task_run(cfg: Config, task: Any, dist: Any, scratch: bool, seed: int, log: Any = None,
                   progress_label: str | None = None) -> TaskRun:
    """The task's data, model and DeepSpeed engine for one arm and seed, trained for this arm's budget (`epochs`
    of its examples from a pretrained model, see training.finetune.plan_budget)."""
    import torch

    from training.engine import build_engine
    from training.finetune import Finetuner, plan_budget, task_lr_ratio, task_train_config
    from training.objectives import objective
    from training.progress import Progress
    from training.tasks import empty_skipped, task_kind

    init = init_folder(cfg)
    tokenizer = _tokenizer(cfg, init)
    eot = tokenizer.token_to_id(cfg.tokenizer.eot_token)
    task = resolve_builtin_files(cfg, task)
    kind = task_kind(task.kind)()
    goal = objective(kind.objective)
    train_ex, eval_ex = kind.load(task)
    torch.manual_seed(seed)
    gpt, gpt_config = _base_model(cfg, init, scratch, tokenizer.get_vocab_size())
    prepared = goal.prepare(tokenizer, train_ex, eval_ex, task, gpt_config.block_size, eot)
    budget = plan_budget(task, len(prepared.train.ids), task.micro_batch_size * dist.world_size, not scratch)
    this_run = task.model_copy(update={"max_steps": budget.steps})  # the schedule spans the run's own steps
    model = goal.model(gpt, gpt_config, prepared)
    eng = build_engine(model, task_train_config(cfg.train, this_run), dist,
                       lr_ratio=task_lr_ratio(task, gpt_config.n_layer))
    progress = Progress(progress_label, budget.steps, enabled=dist.is_main) if progress_label else None
    finetuner = Finetuner(model, eng, this_run, prepared, pad_id=eot, objective=goal, seed=seed, log=log,
                          progress=progress)
    return TaskRun(task, budget, init, goal, prepared, gpt_config, eot, finetuner, (len(train_ex), len(eval_ex)),
                   (empty_skipped(train_ex), empty_skipped(eval_ex)))


def finetune_task(ctx: StageContext, task: Any, dist: Any, log: Any, scratch: bool, seed: int) -> dict[str, Any]:
    from training.finetune import write_json

    cfg = ctx.cfg
    label = f"finetune {task.name}{' (from scratch)' if scratch else ''}" + (
        f" seed {seed}" if cfg.finetune.seeds > 1 else "")
    built = build_task_run(cfg, task, dist, scratch, seed, log, label)
    warn_empty_skipped(ctx, task.name, built.empty_skipped)
    warn_max_steps_cut(ctx, built.task, built.budget.steps)
    if dist.is_main:
        print(f"[{label}] {built.budget.steps:,} steps: {built.budget.reason}", flush=True)
    task, init, goal, prepared, gpt_config, eot = (built.task, built.init, built.goal, built.prepared,
                                                   built.gpt_config, built.eot)
    result = built.finetuner.run()
    out = result_dir(cfg, task, scratch, seed)
    summary = {**result.metrics, "train_examples": built.examples[0], "eval_examples": built.examples[1],
               "train_empty_skipped": len(built.empty_skipped[0]), "eval_empty_skipped": len(built.empty_skipped[1]),
               "planned_steps": built.budget.steps, "from_scratch": scratch, "seed": seed}
    if dist.is_main and result.best_state is not None:
        tok_dir = init if (init / "tokenizer.json").is_file() else ctx.paths.tokenizer
        goal.export(result.best_state, gpt_config, prepared, tok_dir, out / "export", task, eot)
        for name, body in result.reports.items():
            write_json(out / name, body)
        write_json(out / "metrics.json", {"summary": summary, "history": result.history})
    return summary


def warn_max_steps_cut(ctx: StageContext, task: Any, steps: int) -> None:
    """A max_steps the user chose that `epochs` ends sooner is said once: the cut is by design, but not theirs."""
    chosen = task.max_steps != type(task).model_fields["max_steps"].default
    if chosen and steps < task.max_steps:
        ctx.warn(f"task {task.name}: max_steps {task.max_steps}, but {task.epochs:g} epochs end the pretrained arm "
                 f"at {steps} steps; set epochs: null to train to max_steps")


def warn_empty_skipped(ctx: StageContext, name: str, skipped: tuple[list[str], list[str]]) -> None:
    """One warning per task file with rows skipped for empty text; said once, however many arms and seeds run."""
    for split, places in zip(("training", "eval"), skipped, strict=True):
        if not places:
            continue
        ctx.warn(f"task {name}: {len(places)} {split} row(s) with empty text skipped (the first at {places[0]})")


def headline(summary: dict[str, Any]) -> tuple[str, float] | None:
    """The figure the arms are compared on: accuracy for classification, else the eval loss."""
    for metric in ("eval_accuracy", "eval_loss"):
        if metric in summary:
            return metric, summary[metric]
    return None


def compare_arms(ctx: StageContext, task: Any, runs: dict[tuple[bool, int], dict[str, Any]]) -> dict[str, Any]:
    """The gain of pretraining on `task`, paired by seed; printed, logged on the stage's run, and written."""
    import mlflow

    from training.finetune import write_json
    from training.task_metrics import arm_comparison, comparison_line

    scored = {key: headline(s) for key, s in runs.items()}
    if not all(scored.values()):
        return {}
    metric = next(iter(scored.values()))[0]
    by_arm = {scratch: {seed: value for (s, seed), (_, value) in scored.items() if s == scratch}
              for scratch in (False, True)}
    result = arm_comparison(by_arm[False], by_arm[True], metric)
    line = comparison_line(task.name, metric, result)
    if ctx.dist.is_main:
        print(f"[finetune] {line}", flush=True)
        write_json(ctx.paths.finetune / f"{task.name}-comparison.json",
                   {"metric": metric, **result, "line": line,
                    "runs": [{"arm": "scratch" if s else "pretrained", "seed": seed, metric: summary[metric],
                              "planned_steps": summary["planned_steps"], "steps": summary["steps"]}
                             for (s, seed), summary in sorted(runs.items())]})
    if ctx.run is not None:
        mlflow.log_metrics({f"{task.name}.{k}": v for k, v in result.items()}, run_id=ctx.run.info.run_id)
    return {k: result[k] for k in ("pretrained_mean", "scratch_mean", "gain", "gain_min", "gain_max")}


def check_task_keys(cfg: Config) -> None:
    """Keys a task's objective would ignore are refused before anything trains."""
    from training.objectives import objective
    from training.tasks import task_kind

    # A value other than the default was asked for (a config snapshot writes the defaults back, so "set at all"
    # cannot tell).
    defaults = {key: spec.default for key, spec in type(cfg.finetune.tasks[0]).model_fields.items()}
    for i, task in enumerate(cfg.finetune.tasks):
        goal = objective(task_kind(task.kind).objective)
        for key, used in (("head_lr", goal.new_head), ("pooling", goal.pools)):
            if not used and getattr(task, key) not in (None, defaults[key]):
                what = "trains no new head" if key == "head_lr" else "pools nothing"
                raise ConfigError(f"finetune.tasks.{i}.{key}: task {task.name!r} ({goal.name}) {what}; remove the key")


def run(ctx: StageContext) -> dict[str, Any]:
    import mlflow

    from training.engine import init_distributed

    cfg = ctx.cfg
    if not cfg.finetune.tasks:
        return {"tasks": 0, "note": "finetune.tasks is empty: nothing to do"}
    check_task_keys(cfg)
    dist = init_distributed()
    summaries: dict[str, Any] = {}
    parent_run = ctx.run
    for task in cfg.finetune.tasks:
        task_arms, task_seeds = arms(cfg, task), seeds(cfg, task)
        runs = {(scratch, seed): _tracked_task(ctx, task, dist, scratch, seed, parent_run)
                for seed in task_seeds for scratch in task_arms}
        if len(runs) == 1:
            summaries[task.name] = runs[(task_arms[0], task_seeds[0])]
        else:
            compared = compare_arms(ctx, task, runs) if len(task_arms) > 1 else {}
            summaries[task.name] = {"runs": [runs[key] for key in sorted(runs)], **compared}
    if parent_run is not None:
        mlflow.log_text(json.dumps(summaries, indent=2), "finetune_summary.json", run_id=parent_run.info.run_id)
    return {name: _short(s) for name, s in summaries.items()}


def _tracked_task(ctx: StageContext, task: Any, dist: Any, scratch: bool, seed: int, parent_run: Any
                  ) -> dict[str, Any]:
    """One arm and seed of a task, in its own MLflow child run tagged with both."""
    import mlflow

    cfg = ctx.cfg
    arm = "scratch" if scratch else "pretrained"
    tags = {TASK_TAG: task.name, KIND_TAG: task.kind, ARM_TAG: arm, SEED_TAG: str(seed),
            RESULTS_TAG: str(result_dir(cfg, task, scratch, seed).resolve())}
    name = f"finetune/{task.name}" + ("/scratch" if scratch and cfg.finetune.vs_scratch else "") + (
        f"/seed{seed}" if cfg.finetune.seeds > 1 else "")
    child = (stage_run(cfg, name, parent_run_id=parent_run.info.run_id, tags=tags)
             if parent_run is not None else contextlib.nullcontext())
    with child as run:
        def log(metrics: dict[str, float], step: int) -> None:
            if run is not None:
                mlflow.log_metrics(metrics, step=step, run_id=run.info.run_id)

        summary = finetune_task(ctx, task, dist, log, scratch, seed)
        if run is not None:
            # The arm and seed this run is, whichever key said so.
            params = {**task.model_dump(), "planned_steps": summary["planned_steps"], "from_scratch": scratch,
                      "seed": seed}
            mlflow.log_params({f"task.{k}": v for k, v in params.items()}, run_id=run.info.run_id)
            for path in sorted(result_dir(cfg, task, scratch, seed).glob("*.json")):
                mlflow.log_artifact(str(path), run_id=run.info.run_id)
    return summary


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    """What the closing summary line shows of a task: eval figures and steps, the gain where compared, else the
    mean over seeds."""
    if "runs" not in summary:
        return {k: v for k, v in summary.items() if k.startswith("eval_") or k == "steps"}
    compared = {k: v for k, v in summary.items() if k != "runs"}
    if compared:
        return compared
    scored = [headline(r) for r in summary["runs"] if headline(r)]
    if not scored:
        return {"runs": len(summary["runs"])}
    return {"runs": len(summary["runs"]), f"{scored[0][0]}_mean": sum(v for _, v in scored) / len(scored)}
