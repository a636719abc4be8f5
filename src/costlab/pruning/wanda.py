"""``pruning=wanda`` (Sun et al., 2023): importance |W_ij|·‖X_j‖₂ with X the layer's inputs on calibration
batches of the training data; each output row loses its ``amount`` least important weights, as in the
paper (rows are never ranked against each other, so there is no ``scope``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from costlab.data import BatchSampler, ByteCorpus
from costlab.precision import autocast
from costlab.pruning.base import DEFAULT_TARGETS
from costlab.pruning.masks import MaskPruning
from costlab.schema import ConfigError


class Wanda(MaskPruning):
    def __init__(self, name: str, amount: float = 0.5, targets: Any = DEFAULT_TARGETS, calibration_batches: int = 8,
                 recovery_steps: int = 0, recovery_lr: float | None = None):
        super().__init__(name, amount, targets, recovery_steps, recovery_lr)
        self.calibration_batches = calibration_batches

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        n = self.calibration_batches
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError("pruning.calibration_batches", n, "wanda weighs weights by activations and needs "
                              "calibration data: a positive number of training batches")

    def mask(
        self, model: nn.Module, layers: dict[str, nn.Linear], corpus: ByteCorpus, cfg: DictConfig, device: torch.device
    ) -> None:
        batches = calibration_batches(corpus, cfg, self.calibration_batches, device)
        masks = wanda_masks(model, layers, float(self.amount), batches, cfg)
        for n, m in layers.items():
            prune.custom_from_mask(m, "weight", masks[n])


def calibration_batches(corpus: ByteCorpus, cfg: DictConfig, n: int, device: torch.device) -> list[torch.Tensor]:
    t = cfg.trainer
    sampler = BatchSampler(corpus.train, cfg.model.block_size, t.eval_batch_size, t.seed + 2)
    return [sampler.batch(i)[0].to(device) for i in range(n)]


@torch.no_grad()
def wanda_masks(
    model: nn.Module, layers: dict[str, nn.Linear], amount: float, batches: list[torch.Tensor], cfg: DictConfig
) -> dict[str, torch.Tensor]:
    """Keep-masks from one calibration pass through the dense model (not layer by layer)."""
    sq = {n: torch.zeros(m.in_features, device=m.weight.device, dtype=torch.float64) for n, m in layers.items()}

    def hook(name: str) -> Callable:
        def accumulate(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[name] += x.pow(2).sum(0)
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            with autocast(cfg, x.device):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    masks = {}
    for n, m in layers.items():
        score = m.weight.detach().abs().double() * sq[n].sqrt()[None, :]
        k = int(m.in_features * amount)
        mask = torch.ones_like(m.weight, dtype=torch.bool)
        if k:
            mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
        masks[n] = mask
    return masks
