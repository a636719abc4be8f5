"""The loss, and the one evaluation function: mean held-out loss, in training and after it."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from costlab.precision import autocast


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: DictConfig,
    device: torch.device,
    dp_rank: int = 0,
    dp_size: int = 1,
    group: dist.ProcessGroup | None = None,
) -> float:
    """Mean loss per token over ``batches``; the same number on every rank.

    With ``dp_size > 1`` each data-parallel rank takes its rows of *every* batch, so every rank runs the
    same number of forward passes: FSDP's all-gathers and TP's all-reduces are collectives, and a rank
    that skipped a batch would hang its peers. The sums are all-reduced over ``group``.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        xs, ys = x.tensor_split(dp_size)[dp_rank], y.tensor_split(dp_size)[dp_rank]
        empty = xs.size(0) == 0
        if empty:  # fewer rows than ranks: still take part in the collectives, count nothing
            xs, ys = x[:1], y[:1]
        with autocast(cfg, device):
            logits = model(xs.to(device))
        if not empty:
            total[0] += loss_fn(logits, ys.to(device)).double() * ys.numel()
            total[1] += ys.numel()
    if dp_size > 1:
        dist.all_reduce(total, group=group)
    model.train(was_training)
    return float(total[0] / total[1])
