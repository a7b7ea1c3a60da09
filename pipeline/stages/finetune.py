"""The finetune stage: each task in `finetune.tasks` from the pretrained export, one MLflow child run per task.

Outputs per task under `<workdir>/finetune/<task>/` (`<task>-scratch` for the
no-pretraining baseline): `export/` (a Hugging Face folder of the best
weights), `metrics.json`, and for classification `confusion.json`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import BUILTIN_PREFIX, Config, ConfigError
from pipeline.core.runner import StageContext
from pipeline.core.tracking import ARM_TAG, KIND_TAG, TASK_TAG, stage_run
from pipeline.core.workdir import workdir_of


def init_folder(cfg: Config) -> Path:
    return Path(cfg.finetune.init_from) if cfg.finetune.init_from else workdir_of(cfg).export


def task_dir(cfg: Config, task: Any, scratch: bool) -> Path:
    return workdir_of(cfg).task(task.name, scratch)


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


def finetune_task(ctx: StageContext, task: Any, dist: Any, log: Any) -> dict[str, Any]:
    import torch

    from training.engine import build_engine
    from training.finetune import Finetuner, task_train_config, write_json
    from training.objectives import objective
    from training.progress import Progress
    from training.tasks import task_kind

    cfg = ctx.cfg
    scratch = cfg.finetune.from_scratch or task.from_scratch
    init = init_folder(cfg)
    tokenizer = _tokenizer(cfg, init)
    eot = tokenizer.token_to_id(cfg.tokenizer.eot_token)
    task = resolve_builtin_files(cfg, task)
    kind = task_kind(task.kind)()
    goal = objective(kind.objective)
    train_ex, eval_ex = kind.load(task)
    seed = cfg.train.seed if task.seed is None else task.seed
    torch.manual_seed(seed)
    gpt, gpt_config = _base_model(cfg, init, scratch, tokenizer.get_vocab_size())
    prepared = goal.prepare(tokenizer, train_ex, eval_ex, task, gpt_config.block_size, eot)
    model = goal.model(gpt, gpt_config, prepared)
    eng = build_engine(model, task_train_config(cfg.train, task), dist)
    label = f"finetune {task.name}{' (from scratch)' if scratch else ''}"
    progress = Progress(label, task.max_steps, enabled=dist.is_main)
    result = Finetuner(model, eng, task, prepared, pad_id=eot, objective=goal, seed=seed, log=log,
                       progress=progress).run()
    out = ctx.paths.task(task.name, scratch)
    summary = {**result.metrics, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
               "from_scratch": scratch}
    if dist.is_main and result.best_state is not None:
        tok_dir = init if (init / "tokenizer.json").is_file() else ctx.paths.tokenizer
        goal.export(result.best_state, gpt_config, prepared, tok_dir, out / "export", task, eot)
        for name, body in result.reports.items():
            write_json(out / name, body)
        write_json(out / "metrics.json", {"summary": summary, "history": result.history})
    return summary


def run(ctx: StageContext) -> dict[str, Any]:
    import mlflow

    from training.engine import init_distributed

    cfg = ctx.cfg
    if not cfg.finetune.tasks:
        return {"tasks": 0, "note": "finetune.tasks is empty: nothing to do"}
    dist = init_distributed()
    summaries: dict[str, Any] = {}
    parent_run = ctx.run
    for task in cfg.finetune.tasks:
        scratch = cfg.finetune.from_scratch or task.from_scratch
        tags = {TASK_TAG: task.name, KIND_TAG: task.kind, ARM_TAG: "scratch" if scratch else "pretrained"}
        child = (stage_run(cfg, f"finetune/{task.name}", parent_run_id=parent_run.info.run_id, tags=tags)
                 if parent_run is not None else contextlib.nullcontext())
        with child as run:
            def log(metrics: dict[str, float], step: int, _run: Any = run) -> None:
                if _run is not None:
                    mlflow.log_metrics(metrics, step=step, run_id=_run.info.run_id)

            summary = finetune_task(ctx, task, dist, log)
            summaries[task.name] = summary
            if run is not None:
                params = {**task.model_dump(), "from_scratch": scratch}  # the arm this run is, whichever key said so
                mlflow.log_params({f"task.{k}": v for k, v in params.items()}, run_id=run.info.run_id)
                out = ctx.paths.task(task.name, scratch)
                for path in sorted(out.glob("*.json")):
                    mlflow.log_artifact(str(path), run_id=run.info.run_id)
    if parent_run is not None:
        mlflow.log_text(json.dumps(summaries, indent=2), "finetune_summary.json", run_id=parent_run.info.run_id)
    return {name: {k: v for k, v in s.items() if k.startswith("eval_") or k == "steps"}
            for name, s in summaries.items()}
