"""The pretraining loop: DeepSpeed does the partitioning, this file only orders the steps.

Per optimizer step: `grad_accum` micro-batches of `engine(x, y)`, `engine.backward`,
`engine.step` (DeepSpeed applies the update, with clipping, on the last one).
Around it: the learning rate from the step (and the share of max_minutes spent), evaluation, checkpoints, the stop
conditions (max_steps, the max_minutes budget, SIGTERM/SIGUSR1) and the NaN guard.
All ranks take every decision together: the stop flags ride on the same
all-reduce as the loss, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataprep.errors import ScratchgptError
from training import checkpoint, checkpoint_integrity, elastic
from training.config import TrainConfig
from training.engine import Engine
from training.metrics_logger import MetricsLogger
from training.optim import muon_momentum_at, set_muon_momentum
from training.progress import duration, eta_seconds
from training.schedule import extension_tag, in_stable_phase, schedule_meta, train_lr

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLoss(ScratchgptError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the checkpoint of the last good state."""


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; the loop finishes the step, checkpoints and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopResult:
    step: int
    reason: str  # "max_steps", "max_minutes", "signal" or "paused" (run(pause_at=...))
    checkpoint: str | None
    train_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    tokens_per_sec: float = 0.0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # train loss of each step this process ran
    evals: list[dict[str, float]] = field(default_factory=list)  # "seconds": since the budget began (across resumes)


@dataclass
class Trainer:
    eng: Engine
    train_cfg: TrainConfig
    loader: Any  # PackedLoader over the train split
    make_val_loader: Callable[[], Any]  # a fresh val loader (shuffle off) per evaluation
    ckpt_dir: Path
    meta: dict[str, Any]  # written into each checkpoint's scratchgpt.json (model config, hashes)
    bytes_per_token: float  # UTF-8 bytes per val token, for bits per byte
    block_size: int
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # per device; 0 leaves MFU out
    logger: MetricsLogger | None = None
    sample: Callable[[int], str] | None = None  # called on every rank at each eval (ZeRO-3 gathers collectively)
    on_step: Callable[[int], None] | None = None  # after each step: tests use it to send signals at a given step
    progress: bool = False  # print a line per logged step (rank 0 of a CLI run)
    # data.sources: name -> (a fresh val loader of that source alone, its bytes per token, its weight)
    source_val: dict[str, tuple[Callable[[], Any], float, float]] = field(default_factory=dict)
    step: int = 0
    budget_used_s: float = 0.0  # training wall time spent towards max_minutes, across resumes (all ranks agree)
    stable_phase: bool = False  # every step so far ran before a WSD decay (the state can continue a longer run)
    resumed_how: str = ""  # "(written by 2 processes) on 1 process", after resume()

    # ------------------------------------------------------------ resume

    def resume(self) -> str | None:
        """Continue from the newest complete checkpoint, if there is one. Returns its tag."""
        tag = checkpoint_integrity.resume_tag(self.ckpt_dir, self.eng.dist.is_main)  # skips damaged ones
        if tag is None:
            return None
        chosen = extension_tag(self.ckpt_dir, tag, self.train_cfg)
        if chosen != tag:
            checkpoint.rewind(self.eng, self.ckpt_dir, chosen)
            tag = chosen
        self.stable_phase = bool(checkpoint.read_meta(self.ckpt_dir, tag).get("stable_phase"))
        state = checkpoint.load(self.eng, self.ckpt_dir, tag, self.meta["model_config"])
        self.resumed_how = elastic.resumed_how(checkpoint.read_meta(self.ckpt_dir, tag), self.eng.dist.world_size)
        self.step = int(state["step"])
        self.budget_used_s = float(state.get("budget_used_s", 0.0))  # absent in checkpoints of older versions
        self.loader.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])
        return tag

    def save(self, loader_state: dict[str, Any] | None = None) -> str:
        client = {"step": self.step, "loader": loader_state or self.loader.state_dict(),
                  "rng": checkpoint.rng_state(), "budget_used_s": self.budget_used_s}
        meta = {**self.meta, **schedule_meta(self.train_cfg, self.stable_phase)}
        return checkpoint.save(self.eng, self.ckpt_dir, self.step, client, meta)

    # ------------------------------------------------------------ one step

    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        if self.eng.dist.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.eng.dist.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _train_step(self, stop_local: Callable[[], bool], clock: Callable[[], float]) -> tuple[float, bool]:
        """One optimizer step. Returns the mean loss over all ranks and micro-batches, and the agreed stop flag.

        `clock` gives this rank's budget seconds used; their mean over ranks becomes `budget_used_s`, so
        every rank computes the same learning rate from it.
        """
        engine = self.eng.engine
        device = self.eng.dist.device
        world = self.eng.dist.world_size
        accum = self.train_cfg.grad_accum
        total = 0.0
        stop = False
        for micro in range(accum):
            x, y = self.loader.next_batch()
            _, loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            last = micro == accum - 1
            flag = 1.0 if last and stop_local() else 0.0
            loss_sum, stop_votes, used_sum = self._all_reduce([loss.item(), flag, clock()])
            self.budget_used_s = used_sum / world
            if not math.isfinite(loss_sum):
                self._nonfinite(loss_sum / world)
            engine.backward(loss)
            engine.step()
            total += loss_sum / world
            stop = stop_votes > 0
        return total / accum, stop

    def _nonfinite(self, value: float) -> None:
        """Stop before the bad loss reaches the weights. The state this step started from gave the bad loss,
        so it is never saved as good (a checkpoint of it is marked bad); the newest earlier one is named."""
        bad_step = self.step + 1
        tag = checkpoint_integrity.reject_nonfinite(self.ckpt_dir, self.step, value, self.eng.dist.is_main)
        good = (f"the last good state is checkpoint {self.ckpt_dir / tag}" if tag else
                "no checkpoint holds a good state, so a rerun starts from step 0")
        raise NonFiniteLoss(
            f"loss is {value} at step {bad_step}; training stopped, and {good}. Lower train.lr, raise "
            "train.warmup_steps or check the data, then run again."
        )

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        if self.source_val:
            return self._evaluate_sources()
        val_loss = self._val_loss(self.make_val_loader())
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bpb": val_loss / math.log(2) / self.bytes_per_token,
        }

    def _evaluate_sources(self) -> dict[str, float]:
        """val_loss.<name> and val_bpb.<name> on each source's val split; val_loss and val_bpb are their
        means at the sources' weights (the mix training draws from)."""
        out: dict[str, float] = {}
        total = sum(weight for _, _, weight in self.source_val.values())
        val_loss = val_bpb = 0.0
        for name, (make_loader, bytes_per_token, weight) in self.source_val.items():
            loss = self._val_loss(make_loader())
            out[f"val_loss.{name}"] = loss
            out[f"val_bpb.{name}"] = loss / math.log(2) / bytes_per_token
            val_loss += weight / total * loss
            val_bpb += weight / total * out[f"val_bpb.{name}"]
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_bpb": val_bpb, **out}

    def _val_loss(self, val: Any) -> float:
        """Mean loss over eval_batches micro-batches of every rank."""
        import torch

        engine = self.eng.engine
        device = self.eng.dist.device
        engine.eval()
        total = 0.0
        with torch.no_grad():
            for _ in range(self.train_cfg.eval_batches):
                x, y = val.next_batch()
                _, loss = engine(x.to(device), y.to(device))
                total += loss.item()
        engine.train()
        (summed,) = self._all_reduce([total])
        return summed / (self.train_cfg.eval_batches * self.eng.dist.world_size)

    # ------------------------------------------------------------ the loop

    def run(self, pause_at: int | None = None) -> LoopResult:
        """Train to max_steps, the budget or a signal. `pause_at`: return after that step (reason "paused") so
        another run can take turns with this one (bench/pretrain.py interleaves its arms); call run() again."""
        cfg = self.train_cfg
        world = self.eng.dist.world_size
        tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * world * self.block_size
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        started = time.perf_counter() - self.budget_used_s  # the budget counts across resumes
        train_time = 0.0
        steps_timed = 0
        result = LoopResult(step=self.step, reason="max_steps", checkpoint=None)
        last_saved: str | None = None
        with StopRequest() as stop_request:
            while self.step < cfg.max_steps:
                spent = self.budget_used_s / budget_s
                lr = train_lr(cfg, self.step, spent)
                self.eng.set_lr(lr)
                if cfg.optimizer == "muon":
                    set_muon_momentum(self.eng.engine, self.eng.optimizer, muon_momentum_at(self.step, cfg))
                self.stable_phase = in_stable_phase(cfg, self.step, spent) and (self.step == 0 or self.stable_phase)
                t0 = time.perf_counter()
                over_budget = time.perf_counter() - started >= budget_s

                def stop_local(over: bool = over_budget) -> bool:
                    return over or stop_request.signal is not None

                loss, stop = self._train_step(stop_local, clock=lambda: time.perf_counter() - started)
                self.step += 1
                dt = time.perf_counter() - t0
                train_time += dt
                steps_timed += 1
                result.losses.append(loss)
                result.train_loss = loss
                if self.on_step is not None:
                    self.on_step(self.step)
                if self.step % cfg.log_every == 0 or self.step == 1:
                    left = budget_s - (time.perf_counter() - started)
                    eta = eta_seconds(steps_timed, cfg.max_steps - self.step + steps_timed, train_time, left)
                    self._log_train(loss, lr, dt, tokens_per_step, eta)
                done = self.step >= cfg.max_steps
                if self.step % cfg.eval_every == 0 or done or stop:
                    result.val = self._eval_and_sample()
                    result.evals.append({"step": self.step, "seconds": time.perf_counter() - started, **result.val})
                if stop:  # all ranks are here together: count the evaluation above in the saved budget too
                    self.budget_used_s = self._all_reduce([time.perf_counter() - started])[0] / world
                # The last stable-phase state of a WSD run is kept: a longer run continues from it.
                decays_next = self.stable_phase and not in_stable_phase(cfg, self.step, self.budget_used_s / budget_s)
                if self.step % cfg.checkpoint_every == 0 or done or stop or decays_next:
                    last_saved = self.save()
                if stop:
                    result.reason = "signal" if stop_request.signal is not None else "max_minutes"
                    break
                if pause_at is not None and self.step >= pause_at and not done:
                    self.budget_used_s = self._all_reduce([time.perf_counter() - started])[0] / world
                    result.reason = "paused"
                    break
        if steps_timed == 0:  # resumed at max_steps already: report the state as it is
            result.val = self._eval_and_sample()
            last_saved = checkpoint.latest_tag(self.ckpt_dir)
        result.step = self.step
        result.checkpoint = last_saved
        result.train_seconds = train_time
        result.tokens_per_sec = tokens_per_step * steps_timed / train_time if train_time > 0 else 0.0
        return result

    def _log_train(self, loss: float, lr: float, dt: float, tokens_per_step: int, eta: float = math.inf) -> None:
        tokens_per_sec = tokens_per_step / dt
        mfu = self.mfu(tokens_per_sec)
        if self.progress:
            print(f"[pretrain] step {self.step}/{self.train_cfg.max_steps} loss {loss:.4f} lr {lr:.2e} "
                  f"{tokens_per_sec:,.0f} tok/s" + (f" mfu {mfu:.1%}" if mfu is not None else "")
                  + f" ETA {duration(eta)}", flush=True)
        if self.logger is None or not self.logger.enabled:
            return
        metrics = {"train_loss": loss, "lr": lr, "step_time": dt, "tokens_per_sec": tokens_per_sec}
        norm = self.eng.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        if mfu is not None:
            metrics["mfu"] = mfu
        self.logger.log(metrics, self.step)

    def mfu(self, tokens_per_sec: float) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
        if self.peak_flops <= 0 or self.flops_per_token <= 0:
            return None
        return self.flops_per_token * tokens_per_sec / (self.peak_flops * self.eng.dist.world_size)

    def _eval_and_sample(self) -> dict[str, float]:
        if self.peak_flops > 0 and not self.eng.dist.device.startswith("cuda"):
            from training.engine import peak_flops

            self.peak_flops = peak_flops(self.eng.dist.device, self.eng.precision, refresh=True)
        val = self.evaluate()
        if self.logger is not None:
            self.logger.log(val, self.step)
        if self.progress:
            print(f"[pretrain] step {self.step} val_loss {val['val_loss']:.4f} val_bpb {val['val_bpb']:.4f}",
                  flush=True)
        if self.sample is not None:
            text = self.sample(self.step)
            if self.logger is not None:
                self.logger.log_text(text, f"samples/step_{self.step:08d}.txt")
        return val
