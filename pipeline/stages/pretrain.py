"""The pretrain stage: shards + tokenizer -> DeepSpeed checkpoints -> a Hugging Face export, tracked in MLflow.

One process runs as it is; more run under torchrun or srun (ranks from the
environment, read by training.launch). Only rank 0 talks to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.core.runner import StageContext, StageStopped
from pipeline.core.tracking import PRETRAIN_MANIFEST_TAG, TOKENIZER_TAG, flatten, tracking_uri
from pipeline.core.workdir import workdir_of
from pipeline.stages.tokenizer import tokenizer_output


def pretrain_paths(cfg: Config) -> dict[str, Path]:
    paths = workdir_of(cfg)
    return {"shards": paths.shards, "tokenizer": paths.tokenizer, "stage": paths.pretrain,
            "checkpoints": paths.checkpoints, "export": paths.export}


# How a run is watched and saved, not what it trains: with other values the checkpoints still continue (a
# finished run re-evaluates and exports again instead of training from step 0).
WATCH_KEYS = ("log_every", "eval_every", "eval_batches", "checkpoint_every", "sample_prompt", "sample_tokens")


def resume_config(cfg: Config) -> dict[str, Any]:
    """The config as far as it decides whether the checkpoints can be continued: a WSD run's max_steps may grow,
    and the WATCH_KEYS may change."""
    from training.schedule import resumable_train

    train = resumable_train(cfg.train)
    train = train.model_copy(update={k: type(train).model_fields[k].default for k in WATCH_KEYS})
    return with_mix(cfg, cfg.model_copy(update={"train": train}).section_dump("model", "train"))


def identity_config(cfg: Config) -> dict[str, Any]:
    """model and train, and the weights of data.sources (prep and shard leave them out: they change only
    the order pretraining draws in)."""
    return with_mix(cfg, cfg.section_dump("model", "train"))


def with_mix(cfg: Config, sections: dict[str, Any]) -> dict[str, Any]:
    from dataprep.sources import mix_weights

    weights = mix_weights(cfg.data)
    return {**sections, "mix": weights} if weights else sections  # data.inputs: the identity of before


def check(cfg: Config, resumed: bool) -> None:
    """A WSD run given a max_steps its checkpoints cannot reach is refused before its marker is touched."""
    from training.checkpoint import LATEST, CheckpointError
    from training.schedule import ScheduleError, extension_tag

    ckpt_dir = workdir_of(cfg).checkpoints
    latest = ckpt_dir / LATEST
    if not resumed or not latest.is_file():
        return
    try:
        extension_tag(ckpt_dir, latest.read_text(encoding="utf-8").strip(), cfg.train)
    except ScheduleError:
        raise
    except (OSError, ValueError, KeyError, CheckpointError):
        return  # an unreadable checkpoint: the loop's integrity check picks an intact one and says so


def verify(cfg: Config, marker: dict[str, Any]) -> str:
    """The export is there (a deleted one is written again from the last checkpoint)."""
    from training.export import WEIGHTS_FILE

    export = workdir_of(cfg).export
    missing = [name for name in ("config.json", WEIGHTS_FILE) if not (export / name).is_file()]
    return f"{export} lacks {', '.join(missing)}" if missing else ""


def digest(cfg: Config) -> str:
    """What pretraining produced: the export's files (name, size, modification time)."""
    export = workdir_of(cfg).export
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in export.glob("*") if p.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def _read_manifest(shards_dir: Path) -> dict[str, Any]:
    from dataprep.shards import read_manifest

    if not (shards_dir / "manifest.json").is_file():
        raise ConfigError(f"no token shards in {shards_dir} (manifest.json is missing): run `scratchgpt shard` first")
    return read_manifest(shards_dir)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_sampler(model: Any, tokenizer: Any, prompt: str, tokens: int, eot: int, seed: int, device: str):
    """A function step -> text: the same seeded sample on every rank (ZeRO-3 gathers weights collectively)."""
    import torch

    ids = tokenizer.encode(prompt).ids or [eot]

    def sample(step: int) -> str:
        generator = torch.Generator(device=device).manual_seed(seed + step)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, tokens, temperature=0.8, top_k=40, generator=generator)
        return tokenizer.decode(out[0].tolist())

    return sample


@dataclass
class PretrainSetup:
    trainer: Any
    eng: Any
    gcfg: Any
    paths: dict[str, Path]
    n_params: int
    precision: str
    estimate: dict[str, int]
    sampler: Any
    manifest: dict[str, Any]


def build(cfg: Config) -> PretrainSetup:
    """Everything a pretraining run needs, on this rank: model, engine, loaders, trainer (not yet resumed)."""
    from training.launch import DistEnv

    env = DistEnv.from_environ(network_interface=cfg.slurm.network_interface)
    if env.is_distributed:
        env.apply_to_environ()

    from dataprep.shards import manifest_sha256
    from dataprep.tokenizer import eot_id, load_tokenizer
    from training.data import PackedLoader
    from training.elastic import batch_sizes
    from training.engine import (
        available_memory,
        build_engine,
        check_memory,
        enable_activation_checkpointing,
        estimate_memory,
        init_distributed,
        peak_flops,
        resolve_precision,
    )
    from training.loop import Trainer
    from training.model import GPT, GPTConfig

    paths = pretrain_paths(cfg)
    manifest = _read_manifest(paths["shards"])
    tokenizer_output(cfg)
    vocab = cfg.model.vocab_size or manifest["vocab_size"]
    from dataprep.shard_verify import verify_shards

    verify_shards(paths["shards"], cfg.shards.verify, vocab)  # before anything reads a token
    gcfg = GPTConfig.from_model_config(cfg.model, vocab)
    train = cfg.train

    dist = init_distributed()
    train = batch_sizes(train, dist.world_size)  # grad_accum from train.global_batch_size, when set
    precision = resolve_precision(train.precision, dist.device)
    _seed_everything(train.seed)
    model = GPT(gcfg)
    n_params = model.num_params(non_embedding=False)
    estimate = estimate_memory(n_params, gcfg.n_layer, gcfg.n_embd, gcfg.n_head, vocab, gcfg.block_size, train,
                               precision, dist.world_size)
    check_memory(estimate, available_memory(dist.device), train, gcfg.block_size)
    if train.activation_checkpointing:
        enable_activation_checkpointing(model)
    flops_per_token = model.flops_per_token()
    eng = build_engine(model, train, dist)

    loader_args = {"block_size": gcfg.block_size, "micro_batch_size": train.micro_batch_size, "rank": dist.rank,
                   "world_size": dist.world_size, "seed": train.seed,
                   "tokenizer_sha256": manifest["tokenizer_sha256"], "vocab_size": vocab}
    loader = PackedLoader(paths["shards"], "train", **loader_args)

    def make_val_loader() -> PackedLoader:
        return PackedLoader(paths["shards"], "val", shuffle=False, **loader_args)

    bytes_per_token = make_val_loader().tokens_per_sample_bytes
    source_val = {}
    if cfg.data.sources:  # drawn from each source at its weight; val_bpb per source too
        from dataprep.sources import mix_weights
        from training.mixed_loader import MixedLoader, source_val_loaders

        loader = MixedLoader(paths["shards"], "train", mix_weights(cfg.data), **loader_args)
        source_val = source_val_loaders(paths["shards"], mix_weights(cfg.data), loader_args)
    tokenizer = load_tokenizer(paths["tokenizer"])
    sampler = make_sampler(eng.engine.module, tokenizer, train.sample_prompt, train.sample_tokens,
                           eot_id(tokenizer), train.seed, dist.device) if train.sample_tokens > 0 else None
    meta = {"model_config": gcfg.to_dict(), "tokenizer_sha256": manifest["tokenizer_sha256"],
            "manifest_sha256": manifest_sha256(paths["shards"])}
    trainer = Trainer(eng=eng, train_cfg=train, loader=loader, make_val_loader=make_val_loader,
                      ckpt_dir=paths["checkpoints"], meta=meta, bytes_per_token=bytes_per_token,
                      block_size=gcfg.block_size, flops_per_token=flops_per_token,
                      peak_flops=peak_flops(dist.device, precision), sample=sampler, progress=dist.is_main,
                      source_val=source_val)
    return PretrainSetup(trainer=trainer, eng=eng, gcfg=gcfg, paths=paths, n_params=n_params, precision=precision,
                         estimate=estimate, sampler=sampler, manifest=manifest)


def run(ctx: StageContext) -> dict[str, Any]:
    import mlflow
    import torch

    from training.export import export_checkpoint
    from training.metrics_logger import MetricsLogger

    cfg = ctx.cfg
    setup = build(cfg)
    trainer, eng, paths, dist = setup.trainer, setup.eng, setup.paths, setup.eng.dist
    n_params, precision, estimate, sampler, meta = (setup.n_params, setup.precision, setup.estimate,
                                                    setup.sampler, trainer.meta)
    resumed = trainer.resume()
    if resumed and dist.is_main:
        print(f"[pretrain] resumed from {paths['checkpoints'] / resumed} at step {trainer.step} "
              f"{trainer.resumed_how}", flush=True)

    if ctx.run is not None:
        mlflow.set_tags({PRETRAIN_MANIFEST_TAG: meta["manifest_sha256"], TOKENIZER_TAG: meta["tokenizer_sha256"]})
        if not ctx.resumed:
            _log_run_inputs(cfg, paths, eng, n_params, precision, dist.world_size, estimate)
    logger = MetricsLogger(ctx.run.info.run_id, tracking_uri(cfg)) if ctx.run is not None else MetricsLogger(None)
    trainer.logger = logger
    try:
        result = trainer.run()
    finally:
        logger.close()
    overhead = logger.overhead(result.train_seconds)
    epochs = trainer.loader.epochs_seen() if hasattr(trainer.loader, "epochs_seen") else {}  # data.sources only
    if ctx.run is not None:
        mlflow.log_metrics({"tracking_fraction": overhead["tracking_fraction"],
                            "tokens_per_sec_mean": result.tokens_per_sec,
                            **{f"epochs.{name}": float(n) for name, n in epochs.items()}}, step=result.step)
    if result.reason == "signal":
        # No completion marker: the job is ready to be requeued and resumes from the checkpoint.
        raise StageStopped(f"stopped by signal after step {result.step}; checkpoint "
                           f"{paths['checkpoints'] / str(result.checkpoint)}; run the same command again to resume")
    export_dir = None
    sample_text = sampler(result.step) if sampler is not None else ""
    if dist.is_main:
        export_dir = export_checkpoint(paths["checkpoints"], paths["export"], paths["tokenizer"])
        mlflow.log_artifacts(str(export_dir), "export")
        mlflow.log_text(sample_text, "samples/final.txt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return {
        "steps": result.step,
        "stopped_by": result.reason,
        "train_loss": result.train_loss,
        **{k: v for k, v in result.val.items()},
        "tokens_per_sec": result.tokens_per_sec,
        "mfu": trainer.mfu(result.tokens_per_sec) or 0.0,
        "train_seconds": result.train_seconds,
        "tracking_fraction": overhead["tracking_fraction"],
        "params": n_params,
        "world_size": dist.world_size,
        "precision": precision,
        "checkpoint": str(paths["checkpoints"] / str(result.checkpoint)),
        "export": str(export_dir or paths["export"]),
        "sample": sample_text,
        **({"epochs": epochs} if epochs else {}),
    }


def _log_run_inputs(cfg: Config, paths: dict[str, Path], eng: Any, n_params: int, precision: str,
                    world_size: int, estimate: dict[str, int]) -> None:
    import mlflow

    from pipeline.redact import redact_tree

    rest = flatten(cfg.model_dump(mode="json", exclude={"model", "train"}))  # model/train come from stage_run
    mlflow.log_params({**rest, "n_params": n_params, "world_size": world_size, "precision": precision,
                       "memory_estimate_bytes": estimate["total"]})
    mlflow.log_dict(redact_tree(eng.ds_config), "deepspeed_config.json")
    mlflow.log_artifacts(str(paths["tokenizer"]), "tokenizer")
