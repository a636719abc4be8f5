"""The training loop: AdamW, warm-up + cosine learning rate, gradient accumulation and clipping,
mixed precision, periodic evaluation, and per-step metrics logged from rank 0."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from costlab.faults import Stopped, StopWatcher
from costlab.measure.metrics import StepStats, now, state_bytes_per_rank
from costlab.measure.names import TRAIN_LOSS
from costlab.parallelism.core import DistEnv, Parallel
from costlab.precision import grad_scaler
from costlab.training import checkpoint
from costlab.training.data import BatchSampler, ByteCorpus, eval_batches


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    t = cfg.trainer
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))


PRINT_AT_LEAST_EVERY_S = 10.0  # a progress line at least this often, whatever trainer.print_every says


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


def train(
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    corpus: ByteCorpus,
    cfg: DictConfig,
    env: DistEnv,
    logger=None,
    step_hooks: Sequence[Callable[[int], None]] = (),
    stop: StopWatcher | None = None,
    resumable: bool = False,
) -> TrainResult:
    """``step_hooks`` run before each step with its index, and once after the last with ``max_steps``
    (train-time compression: gradual pruning masks, QAT fake quantization).

    ``resumable`` (the run's own training, not a recovery fine-tune): with ``trainer.checkpoint_interval``,
    the run starts from its latest checkpoint if it has one (a
    restart, or ``trainer.resume``), saves one every that many steps, and on a stop signal (``stop``:
    preemption) saves one at the step boundary every rank agrees on before it stops."""
    t = cfg.trainer
    device = env.device
    block = cfg.model.block_size
    sampler = BatchSampler(corpus.train, block, t.batch_size, t.seed)
    val = eval_batches(corpus.val, block, t.eval_batch_size, t.eval_batches)
    scaler = grad_scaler(cfg, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    result = TrainResult(stats=StepStats(t.timing_warmup_steps, t.batch_size * block))
    parallel.model.train()

    interval = int(t.get("checkpoint_interval", 0) or 0) if resumable else 0
    first = 0
    resumed = checkpoint.load(parallel.model, optimizer, scaler, cfg, env) if resumable else None
    if resumed is not None:
        first = resumed.step
        result.fault = {checkpoint.LOST_S: resumed.lost_s, checkpoint.RESUMES: resumed.resumes}
        if env.is_main:
            print(f"resumed from {resumed.path.name} (step {first}); {resumed.lost_s:.1f}s lost to faults so far",
                  flush=True)
    if resumable:
        result.fault[checkpoint.RESTARTS] = checkpoint.restart_count()
    checkpoints = checkpoint.Checkpointer(cfg, env, resumed) if interval else None
    if stop is not None and interval:
        stop.defer = True  # a stop signal is acted on at a step boundary: checkpoint, then stop
    started = printed = time.perf_counter()
    for step in range(first, t.max_steps):
        t0 = now(device)
        for hook in step_hooks:
            hook(step)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = sampler.batch(step, parallel.dp_rank, parallel.dp_size)
        loss = parallel.forward_backward(x.to(device), y.to(device), cfg, scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = parallel.clip_grad_norm(params, t.grad_clip) if t.grad_clip else None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if step == 0:  # gradients and optimizer state exist now; shards are what this rank holds
            result.state_bytes = state_bytes_per_rank(parallel.model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        logged = step % t.log_every == 0 or step == t.max_steps - 1
        if logged:
            loss = parallel.global_loss(loss)
        seconds = now(device) - t0
        result.stats.add(seconds)
        if logged and env.is_main:  # the only host read of the loss, and only on the rank that reports it
            result.final_loss = loss.item()
        if logged and logger is not None:
            metrics = {
                TRAIN_LOSS: result.final_loss,
                "train/lr": lr,
                "train/step_time_ms": 1000 * seconds,
                "train/tokens_per_s": t.batch_size * block / seconds,
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            if scaler is not None:
                metrics["train/loss_scale"] = scaler.get_scale()
            logger.log(metrics, step)
            clock = time.perf_counter()
            if step % t.print_every == 0 or step == t.max_steps - 1 or clock - printed >= PRINT_AT_LEAST_EVERY_S:
                printed = clock
                eta = (clock - started) / (step + 1 - first) * (t.max_steps - step - 1)
                print(
                    f"step {step + 1}/{t.max_steps}  loss {result.final_loss:.4f}  lr {lr:.2e}"
                    f"  {1000 * seconds:.0f} ms  {t.batch_size * block / seconds:.0f} tok/s  eta {eta:.0f}s",
                    flush=True,
                )
        if t.eval_interval and (step + 1) % t.eval_interval == 0 and step + 1 < t.max_steps:
            val_loss = parallel.evaluate(val, cfg)
            if logger is not None:
                logger.log({"val/loss": val_loss}, step + 1)
                print(f"step {step + 1}/{t.max_steps}  val/loss {val_loss:.4f}", flush=True)
        if checkpoints is None or step + 1 == t.max_steps:
            continue
        saved = (step + 1) % interval == 0
        if saved:
            checkpoints.save(parallel.model, optimizer, scaler, step + 1)
        if stop is not None and checkpoint.stop_agreed(stop.requested, env):
            if not saved:
                checkpoints.save(parallel.model, optimizer, scaler, step + 1)
            checkpoints.finish()
            if env.is_main:
                print(f"stopping at step {step + 1}: checkpoint saved for trainer.resume", flush=True)
            raise Stopped(stop.signum or signal.SIGTERM)
    if checkpoints is not None:
        checkpoints.finish()
        result.fault.update(checkpoints.metrics())
    if stop is not None:
        stop.defer = False
        if stop.requested:  # the signal came during the last step: stop now
            raise Stopped(stop.signum or signal.SIGTERM)
    for hook in step_hooks:
        hook(t.max_steps)
    return result
