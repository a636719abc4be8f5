"""The training loop: the optimizer option, warm-up + cosine learning rate, gradient accumulation and clipping,
mixed precision, periodic evaluation, and per-step metrics logged from rank 0."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from costlab.data import BatchSampler, ByteCorpus, eval_batches
from costlab.faults import Stopped, StopWatcher
from costlab.measure.activations import SavedActivations, unmeasured_reason
from costlab.measure.allocator import AllocatorPeak, malloc_meter
from costlab.measure.metrics import StepStats, now, state_bytes_per_rank
from costlab.measure.names import TRAIN_LOSS
from costlab.parallelism.core import DistEnv, Parallel
from costlab.precision import grad_scaler
from costlab.training import checkpoint
from costlab.training.optimizers import build_optimizer, set_lr

PRINT_AT_LEAST_EVERY_S = 10.0  # a progress line at least this often, whatever trainer.print_every says


def finetune_alone(model: nn.Module, cfg: DictConfig, corpus: ByteCorpus, device: torch.device) -> float:
    """Fine-tune ``model`` on this rank alone as ``cfg`` says (a pruned model's recovery); the final loss."""
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=device)
    return Trainer(Parallel(model=model), build_optimizer(model, cfg), corpus, cfg, env).train().final_loss


def lr_at(step: int, cfg: DictConfig) -> float:
    """Linear warm-up to ``trainer.lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    t = cfg.trainer
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    min_lr = t.lr * t.min_lr_ratio
    return min_lr + 0.5 * (t.lr - min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    stats: StepStats
    final_loss: float = float("nan")
    state_bytes: dict[str, float] = field(default_factory=dict)
    log_time_s: float = 0.0
    fault: dict[str, float] = field(default_factory=dict)  # fault/* and checkpoint/* figures
    activations_bytes: float | None = None  # held for backward at the first step's peak (SavedActivations)
    allocated_bytes: float | None = None  # on CPU: a warm-up step's allocator peak over its start (AllocatorPeak)


@dataclass
class Step:
    """What one training step leaves for its log line."""

    index: int
    lr: float
    seconds: float
    grad_norm: torch.Tensor | None
    logged: bool  # whether the step's loss was reduced over the ranks (every trainer.log_every steps)


class Trainer:
    """One rank's training: :meth:`train` runs the loop, and each job of a step (the step itself, logging,
    evaluation, checkpoints, a stop signal) is a method of its own.

    ``step_hooks`` run before each step with its index, and once after the last with ``max_steps``
    (train-time compression: gradual pruning masks, QAT fake quantization).

    ``resumable`` (the run's own training, not a recovery fine-tune): with ``trainer.checkpoint_interval``,
    the run starts from its latest checkpoint if it has one (a restart, or ``trainer.resume``), saves one
    every that many steps, and on a stop signal (``stop``: preemption) saves one at the step boundary every
    rank agrees on before it stops."""

    def __init__(
        self,
        parallel: Parallel,
        optimizer: torch.optim.Optimizer,
        corpus: ByteCorpus,
        cfg: DictConfig,
        env: DistEnv,
        logger=None,
        step_hooks: Sequence[Callable[[int], None]] = (),
        stop: StopWatcher | None = None,
        resumable: bool = False,
    ):
        t = cfg.trainer
        self.parallel, self.optimizer, self.cfg, self.env = parallel, optimizer, cfg, env
        self.logger, self.step_hooks, self.watcher, self.resumable = logger, step_hooks, stop, resumable
        self.max_steps = t.max_steps
        self.tokens_per_step = t.batch_size * cfg.model.block_size
        self.sampler = BatchSampler(corpus.train, cfg.model.block_size, t.batch_size, t.seed)
        self.val = eval_batches(corpus.val, cfg.model.block_size, t.eval_batch_size, t.eval_batches)
        self.scaler = grad_scaler(cfg, env.device)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.result = TrainResult(stats=StepStats(t.timing_warmup_steps, self.tokens_per_step))
        self.interval = int(t.get("checkpoint_interval", 0) or 0) if resumable else 0
        self.checkpoints: checkpoint.Checkpointer | None = None
        self.first = 0  # the first step still to run: past 0 when resumed
        self.started = self.printed = 0.0  # wall clock of the loop's start and of the last progress line

    def train(self) -> TrainResult:
        self.parallel.model.train()
        self.resume()
        self.started = self.printed = time.perf_counter()
        for step in range(self.first, self.max_steps):
            self.log(self.train_step(step))
            self.evaluate(step)
            saved = self.checkpoint(step)
            self.stop(step, saved)
        return self.finish()

    def resume(self) -> None:
        """A resumable run continues from its latest checkpoint, if it has one, and arms checkpoints."""
        if not self.resumable:
            return
        resumed = checkpoint.load(self.parallel.model, self.optimizer, self.scaler, self.cfg, self.env)
        if resumed is not None:
            self.first = resumed.step
            self.result.fault = {checkpoint.LOST_S: resumed.lost_s, checkpoint.RESUMES: resumed.resumes}
            if self.env.is_main:
                print(f"resumed from {resumed.path.name} (step {self.first}); "
                      f"{resumed.lost_s:.1f}s lost to faults so far", flush=True)
        self.result.fault[checkpoint.RESTARTS] = checkpoint.restart_count()
        if self.interval:
            self.checkpoints = checkpoint.Checkpointer(self.cfg, self.env, resumed)
            if self.watcher is not None:
                self.watcher.defer = True  # a stop signal is acted on at a step boundary: checkpoint, then stop

    def train_step(self, step: int) -> Step:
        """Hooks, learning rate, forward and backward, optimizer step; timed to the end of the loss's
        reduction over the ranks, which logged steps include."""
        t0 = now(self.env.device)
        for hook in self.step_hooks:
            hook(step)
        lr = lr_at(step, self.cfg)
        set_lr(self.optimizer, lr)
        x, y = self.sampler.batch(step, self.parallel.dp_rank, self.parallel.dp_size)
        device = self.env.device
        meters = self.meters(step) if step <= self.first + 1 else {}
        if meters:  # warm-up steps: left out of timings
            with contextlib.ExitStack() as stack:
                for meter in meters.values():
                    stack.enter_context(meter)
                loss = self.parallel.forward_backward(x.to(device), y.to(device), self.cfg, self.scaler)
            if "activations" in meters:
                self.result.activations_bytes = float(meters["activations"].held)
            if "allocator" in meters:
                self.result.allocated_bytes = float(meters["allocator"].allocated)
        else:
            loss = self.parallel.forward_backward(x.to(device), y.to(device), self.cfg, self.scaler)
        grad_norm = self.optimizer_step(step)
        logged = step % self.cfg.trainer.log_every == 0 or step == self.max_steps - 1
        if logged:
            loss = self.parallel.global_loss(loss)
        seconds = now(device) - t0
        self.result.stats.add(seconds)
        if logged and self.env.is_main:  # the only host read of the loss, and only on the rank that reports it
            self.result.final_loss = loss.item()
        return Step(step, lr, seconds, grad_norm, logged)

    def meters(self, step: int) -> dict[str, Any]:
        """The dispatch modes that measure ``step``: the saved activations on the first, and on CPU the allocator's
        peak on the second where that is a warm-up step too, else on the first (:mod:`costlab.measure.allocator`);
        the allocator's outermost, so that its first reading comes before the other's."""
        if unmeasured_reason(self.cfg) is not None:
            return {}
        out: dict[str, Any] = {}
        in_use = malloc_meter() if self.env.device.type == "cpu" else None
        second = int(self.cfg.trainer.timing_warmup_steps) >= 2 and self.max_steps > self.first + 1
        if in_use is not None and step == self.first + int(second):
            out["allocator"] = AllocatorPeak(in_use)
        if step == self.first:
            out["activations"] = SavedActivations(self.parallel.model, *getattr(self.parallel, "parts", {}).values())
        return out

    def optimizer_step(self, step: int) -> torch.Tensor | None:
        """Unscale, clip and apply the gradients; returns their norm before clipping (None: no clipping)."""
        scaler, clip = self.scaler, self.cfg.trainer.grad_clip
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = self.parallel.clip_grad_norm(self.params, clip) if clip else None
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        if step == 0:  # gradients and optimizer state exist now; shards are what this rank holds
            self.result.state_bytes = state_bytes_per_rank(self.parallel.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=self.parallel.gradients_to_none(self.cfg))
        return grad_norm

    def log(self, step: Step) -> None:
        """The step's metrics, every ``trainer.log_every`` steps, and a progress line now and then."""
        if not step.logged or self.logger is None:
            return
        metrics = {
            TRAIN_LOSS: self.result.final_loss,
            "train/lr": step.lr,
            "train/step_time_ms": 1000 * step.seconds,
            "train/tokens_per_s": self.tokens_per_step / step.seconds,
        }
        if step.grad_norm is not None:
            metrics["train/grad_norm"] = float(step.grad_norm)
        if self.scaler is not None:
            metrics["train/loss_scale"] = self.scaler.get_scale()
        self.logger.log(metrics, step.index)
        self.print_progress(step)

    def print_progress(self, step: Step) -> None:
        """Every ``trainer.print_every`` steps, the last one, and at least every ``PRINT_AT_LEAST_EVERY_S``."""
        clock, i = time.perf_counter(), step.index
        due = i % self.cfg.trainer.print_every == 0 or i == self.max_steps - 1
        if not due and clock - self.printed < PRINT_AT_LEAST_EVERY_S:
            return
        self.printed = clock
        eta = (clock - self.started) / (i + 1 - self.first) * (self.max_steps - i - 1)
        print(
            f"step {i + 1}/{self.max_steps}  loss {self.result.final_loss:.4f}  lr {step.lr:.2e}"
            f"  {1000 * step.seconds:.0f} ms  {self.tokens_per_step / step.seconds:.0f} tok/s  eta {eta:.0f}s",
            flush=True,
        )

    def evaluate(self, step: int) -> None:
        """Validation loss every ``trainer.eval_interval`` steps; the last step's is the final evaluation's."""
        done, every = step + 1, self.cfg.trainer.eval_interval
        if not every or done % every or done >= self.max_steps:
            return
        val_loss = self.parallel.evaluate(self.val, self.cfg)  # collective: every rank
        if self.logger is not None:
            self.logger.log({"val/loss": val_loss}, done)
            print(f"step {done}/{self.max_steps}  val/loss {val_loss:.4f}", flush=True)

    def checkpoint(self, step: int) -> bool:
        """A checkpoint every ``trainer.checkpoint_interval`` steps (none after the last: the run ends
        there); returns whether it saved one."""
        done = step + 1
        if self.checkpoints is None or done == self.max_steps or done % self.interval:
            return False
        self.checkpoints.save(self.parallel.model, self.optimizer, self.scaler, done)
        return True

    def stop(self, step: int, saved: bool) -> None:
        """On a stop signal every rank agrees on, a checkpoint where this step ends (unless ``saved`` one
        already), then :class:`Stopped`."""
        done = step + 1
        if self.checkpoints is None or done == self.max_steps or self.watcher is None:
            return
        if not checkpoint.stop_agreed(self.watcher.requested, self.env):  # collective: every rank
            return
        if not saved:
            self.checkpoints.save(self.parallel.model, self.optimizer, self.scaler, done)
        self.checkpoints.finish()
        if self.env.is_main:
            print(f"stopping at step {done}: checkpoint saved for trainer.resume", flush=True)
        raise Stopped(self.watcher.signum or signal.SIGTERM)

    def finish(self) -> TrainResult:
        """After the last step: the checkpoints' figures, a stop signal that came too late to act on at a
        step boundary, and the hooks' call with ``max_steps``."""
        if self.checkpoints is not None:
            self.checkpoints.finish()
            self.result.fault.update(self.checkpoints.metrics())
        if self.watcher is not None:
            self.watcher.defer = False
            if self.watcher.requested:  # the signal came during the last step: stop now
                raise Stopped(self.watcher.signum or signal.SIGTERM)
        for hook in self.step_hooks:
            hook(self.max_steps)
        return self.result
