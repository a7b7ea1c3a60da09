"""The pretrain stage: shards + tokenizer -> DeepSpeed checkpoints -> a Hugging Face export, tracked in MLflow.

One process runs as it is; more run under torchrun or srun (ranks from the
environment, read by pipeline.launch). Only rank 0 talks to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.stage_tokenizer import tokenizer_output
from pipeline.tracking import flatten, stage_run, tracking_uri, use_tracking

RUN_ID_FILE = "mlflow_run_id"


def pretrain_paths(cfg: Config) -> dict[str, Path]:
    work = Path(cfg.workdir)
    return {"shards": work / "shards", "tokenizer": work / "tokenizer", "stage": work / "pretrain",
            "checkpoints": work / "pretrain" / "checkpoints", "export": work / "pretrain" / "export"}


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


@contextlib.contextmanager
def _mlflow_run(cfg: Config, paths: dict[str, Path], resuming: bool, tags: dict[str, str]):
    """The stage's MLflow run; a resumed training continues the run it started in."""
    import mlflow

    run_id_file = paths["stage"] / RUN_ID_FILE
    if resuming and run_id_file.is_file():
        run_id = run_id_file.read_text().strip()
        use_tracking(cfg)
        try:
            mlflow.MlflowClient().get_run(run_id)
        except Exception:
            run_id = ""
        if run_id:
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
                yield run, True
            return
    with stage_run(cfg, "pretrain", sections=("model", "train"), tags=tags) as run:
        paths["stage"].mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run.info.run_id)
        yield run, False


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
    from pipeline.launch import DistEnv

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
    tokenizer = load_tokenizer(paths["tokenizer"])
    sampler = make_sampler(eng.engine.module, tokenizer, train.sample_prompt, train.sample_tokens,
                           eot_id(tokenizer), train.seed, dist.device) if train.sample_tokens > 0 else None
    meta = {"model_config": gcfg.to_dict(), "tokenizer_sha256": manifest["tokenizer_sha256"],
            "manifest_sha256": manifest_sha256(paths["shards"])}
    trainer = Trainer(eng=eng, train_cfg=train, loader=loader, make_val_loader=make_val_loader,
                      ckpt_dir=paths["checkpoints"], meta=meta, bytes_per_token=bytes_per_token,
                      block_size=gcfg.block_size, flops_per_token=flops_per_token,
                      peak_flops=peak_flops(dist.device, precision), sample=sampler, progress=dist.is_main)
    return PretrainSetup(trainer=trainer, eng=eng, gcfg=gcfg, paths=paths, n_params=n_params, precision=precision,
                         estimate=estimate, sampler=sampler, manifest=manifest)


def run_pretrain(cfg: Config) -> dict[str, Any]:
    import torch

    from training.metrics_logger import MetricsLogger

    setup = build(cfg)
    trainer, eng, paths, dist = setup.trainer, setup.eng, setup.paths, setup.eng.dist
    n_params, precision, estimate, sampler, meta = (setup.n_params, setup.precision, setup.estimate,
                                                    setup.sampler, trainer.meta)
    resumed = trainer.resume()
    if resumed and dist.is_main:
        print(f"[pretrain] resumed from {paths['checkpoints'] / resumed} at step {trainer.step} "
              f"{trainer.resumed_how}", flush=True)

    tags = {"config_hash": cfg.section_hash("model", "train"), "shard_manifest_sha256": meta["manifest_sha256"],
            "tokenizer_sha256": meta["tokenizer_sha256"]}
    run_ctx = _mlflow_run(cfg, paths, resumed is not None, tags) if dist.is_main else contextlib.nullcontext()
    with run_ctx as opened:
        logger = MetricsLogger(None)
        if opened is not None:
            run, continued = opened
            logger = MetricsLogger(run.info.run_id, tracking_uri(cfg))
            if not continued:
                _log_run_inputs(cfg, paths, eng, n_params, precision, dist.world_size, estimate)
        trainer.logger = logger
        try:
            result = trainer.run()
        finally:
            logger.close()
        overhead = logger.overhead(result.train_seconds)
        if dist.is_main:
            _log_final(logger, result, overhead)
        stopped = result.reason == "signal"
        export_dir = None
        sample_text = ""
        if stopped:
            if dist.is_main:
                _end_run_killed(opened)
                print(f"[pretrain] stopped by signal after step {result.step}; checkpoint "
                      f"{paths['checkpoints'] / str(result.checkpoint)}; run the same command again to resume",
                      flush=True)
        else:
            sample_text = sampler(result.step) if sampler is not None else ""
            if dist.is_main:
                export_dir = export_checkpoint(paths["checkpoints"], paths["export"], paths["tokenizer"])
                import mlflow

                mlflow.log_artifacts(str(export_dir), "export")
                mlflow.log_text(sample_text, "samples/final.txt")
    if stopped:
        # Exit 0 without a completion marker: the job is ready to be requeued and resumes from the checkpoint.
        sys.stdout.flush()
        raise SystemExit(0)
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
    }


def _log_run_inputs(cfg: Config, paths: dict[str, Path], eng: Any, n_params: int, precision: str,
                    world_size: int, estimate: dict[str, int]) -> None:
    import mlflow

    rest = flatten(cfg.model_dump(mode="json", exclude={"model", "train"}))  # model/train come from stage_run
    mlflow.log_params({**rest, "n_params": n_params, "world_size": world_size, "precision": precision,
                       "memory_estimate_bytes": estimate["total"]})
    mlflow.log_dict(eng.ds_config, "deepspeed_config.json")
    mlflow.log_artifacts(str(paths["tokenizer"]), "tokenizer")


def _log_final(logger: Any, result: Any, overhead: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics({"tracking_fraction": overhead["tracking_fraction"],
                        "tokens_per_sec_mean": result.tokens_per_sec}, step=result.step)


def _end_run_killed(opened: Any) -> None:
    import mlflow

    if opened is not None:
        mlflow.set_tag("stopped_by", "signal")
        mlflow.end_run("KILLED")  # a resumed run reopens it and finishes it


def export_checkpoint(ckpt_dir: Path, out_dir: Path, tokenizer_dir: Path | None, tag: str | None = None) -> Path:
    """Join a checkpoint's ZeRO partitions into full fp32 weights and write a Hugging Face GPT-2 folder."""
    from training.checkpoint import full_state_dict
    from training.export import export_hf
    from training.model import GPTConfig

    state, meta = full_state_dict(ckpt_dir, tag)
    gcfg = GPTConfig.from_dict(meta["model_config"])
    out = export_hf(state, gcfg, tokenizer_dir if tokenizer_dir and tokenizer_dir.is_dir() else None, out_dir)
    (Path(out) / "scratchgpt_checkpoint.json").write_text(
        json.dumps({"checkpoint": str(Path(ckpt_dir).resolve() / meta["tag"]), "step": meta["step"]}, indent=2)
    )
    return Path(out)
