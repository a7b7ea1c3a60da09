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
from pipeline.core.tracking import stage_run


def init_folder(cfg: Config) -> Path:
    return Path(cfg.finetune.init_from) if cfg.finetune.init_from else Path(cfg.workdir) / "pretrain" / "export"


def task_dir(cfg: Config, task: Any, scratch: bool) -> Path:
    return Path(cfg.workdir) / "finetune" / (f"{task.name}-scratch" if scratch else task.name)


def resolve_builtin_files(cfg: Config, task: Any) -> Any:
    """The task with `builtin:python-docs-kind/{train,eval}` replaced by files written under the workdir."""
    if not (task.train.startswith(BUILTIN_PREFIX) or task.eval.startswith(BUILTIN_PREFIX)):
        return task
    from dataprep.builtin_corpus import NAME, materialise, write_kind_task

    corpus = materialise(NAME, Path(cfg.workdir) / "prep" / "input", cfg.data.text_key, cfg.data.id_key)
    files = write_kind_task(corpus, Path(cfg.workdir) / "finetune" / "data" / "python-docs-kind",
                            text_key=cfg.data.text_key, id_key=cfg.data.id_key)
    update = {key: str(files[getattr(task, key).rsplit("/", 1)[1]]) for key in ("train", "eval")
              if getattr(task, key).startswith(BUILTIN_PREFIX)}
    return task.model_copy(update=update)


def _tokenizer(cfg: Config, init: Path) -> Any:
    from tokenizers import Tokenizer

    for path in (init / "tokenizer.json", Path(cfg.workdir) / "tokenizer" / "tokenizer.json"):
        if path.is_file():
            return Tokenizer.from_file(str(path))
    raise ConfigError(f"no tokenizer.json in {init} or {Path(cfg.workdir) / 'tokenizer'}: run `scratchgpt tokenizer`")


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


def finetune_task(cfg: Config, task: Any, dist: Any, log: Any) -> dict[str, Any]:
    import torch

    from training.classifier import GPTClassifier, export_classifier
    from training.engine import build_engine
    from training.export import export_hf
    from training.finetune import Finetuner, encode_classification, encode_sft, task_train_config, write_json
    from training.tasks import LabelMap, task_kind

    scratch = cfg.finetune.from_scratch or task.from_scratch
    init = init_folder(cfg)
    tokenizer = _tokenizer(cfg, init)
    eot = tokenizer.token_to_id(cfg.tokenizer.eot_token)
    task = resolve_builtin_files(cfg, task)
    kind = task_kind(task.kind)()
    train_ex, eval_ex = kind.load(task)
    seed = cfg.train.seed if task.seed is None else task.seed
    torch.manual_seed(seed)
    gpt, gpt_config = _base_model(cfg, init, scratch, tokenizer.get_vocab_size())
    block = gpt_config.block_size
    labels = None
    if kind.objective == "classification":
        labels = LabelMap.from_examples(train_ex)
        train = encode_classification(tokenizer, train_ex, labels.ids(train_ex, task.train), block, task.truncate)
        evaluation = encode_classification(tokenizer, eval_ex, labels.ids(eval_ex, task.eval), block, task.truncate)
        model: Any = GPTClassifier(gpt_config, len(labels.labels))
        model.gpt = gpt
    else:
        train = encode_sft(tokenizer, train_ex, eot, block, task.truncate)
        evaluation = encode_sft(tokenizer, eval_ex, eot, block, task.truncate)
        model = gpt
    eng = build_engine(model, task_train_config(cfg.train, task), dist)
    result = Finetuner(model, eng, task, train, evaluation, pad_id=eot, objective=kind.objective,
                       seed=seed, n_classes=len(labels.labels) if labels else 0, log=log).run()
    out = task_dir(cfg, task, scratch)
    summary = {**result.metrics, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
               "from_scratch": scratch}
    if dist.is_main and result.best_state is not None:
        tok_dir = init if (init / "tokenizer.json").is_file() else Path(cfg.workdir) / "tokenizer"
        if labels is not None:
            export_classifier(result.best_state, gpt_config, labels.labels, eot, tok_dir, out / "export",
                              truncate=task.truncate)
            write_json(out / "confusion.json", {"labels": labels.labels, "matrix": result.confusion})
        else:
            export_hf(result.best_state, gpt_config, tok_dir, out / "export")
        write_json(out / "metrics.json", {"summary": summary, "history": result.history})
    return summary


def run_finetune(cfg: Config) -> dict[str, Any]:
    import mlflow

    from training.engine import init_distributed

    if not cfg.finetune.tasks:
        return {"tasks": 0, "note": "finetune.tasks is empty: nothing to do"}
    dist = init_distributed()
    summaries: dict[str, Any] = {}
    parent = stage_run(cfg, "finetune", sections=("finetune",)) if dist.is_main else contextlib.nullcontext()
    with parent as parent_run:
        for task in cfg.finetune.tasks:
            child = (stage_run(cfg, f"finetune/{task.name}", parent_run_id=parent_run.info.run_id,
                               tags={"task": task.name, "kind": task.kind})
                     if dist.is_main else contextlib.nullcontext())
            with child as run:
                def log(metrics: dict[str, float], step: int) -> None:
                    if run is not None:
                        mlflow.log_metrics(metrics, step=step, run_id=run.info.run_id)

                summary = finetune_task(cfg, task, dist, log)
                summaries[task.name] = summary
                if run is not None:
                    mlflow.log_params({f"task.{k}": v for k, v in task.model_dump().items()}, run_id=run.info.run_id)
                    out = task_dir(cfg, task, summary["from_scratch"])
                    for name in ("metrics.json", "confusion.json"):
                        if (out / name).is_file():
                            mlflow.log_artifact(str(out / name), run_id=run.info.run_id)
        if parent_run is not None:
            mlflow.log_text(json.dumps(summaries, indent=2), "finetune_summary.json", run_id=parent_run.info.run_id)
    return {name: {k: v for k, v in s.items() if k.startswith("eval_") or k == "steps"}
            for name, s in summaries.items()}
