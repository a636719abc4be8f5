"""The training loop: AdamW, warm-up + cosine learning rate, gradient accumulation and clipping,
mixed precision, periodic evaluation, and per-step metrics logged from rank 0."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from costlab.data import BatchSampler, ByteCorpus, eval_batches
from costlab.metrics import StepStats, now, state_bytes_per_rank
from costlab.names import TRAIN_LOSS
from costlab.parallelism.core import DistEnv, Parallel
from costlab.precision import grad_scaler


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


def train(
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    corpus: ByteCorpus,
    cfg: DictConfig,
    env: DistEnv,
    logger=None,
    step_hooks: Sequence[Callable[[int], None]] = (),
) -> TrainResult:
    """``step_hooks`` run before each step with its index, and once after the last with ``max_steps``
    (train-time compression: gradual pruning masks, QAT fake quantization)."""
    t = cfg.trainer
    device = env.device
    block = cfg.model.block_size
    sampler = BatchSampler(corpus.train, block, t.batch_size, t.seed)
    val = eval_batches(corpus.val, block, t.eval_batch_size, t.eval_batches)
    scaler = grad_scaler(cfg, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    result = TrainResult(stats=StepStats(t.timing_warmup_steps, t.batch_size * block))
    parallel.model.train()

    started = printed = time.perf_counter()
    for step in range(t.max_steps):
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
                eta = (clock - started) / (step + 1) * (t.max_steps - step - 1)
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
    for hook in step_hooks:
        hook(t.max_steps)
    return result
