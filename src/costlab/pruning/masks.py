"""Options that zero weights through ``torch.nn.utils.prune``'s reparametrisation (``weight = weight_orig *
weight_mask``), so that recovery fine-tuning holds the zeros, and ``prune.remove`` makes them permanent.

A masked dense tensor still costs its full bytes and time: the zeros save something only where a
sparse format or sparse kernels use them (``semi_structured`` on CUDA).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from costlab.data import ByteCorpus
from costlab.pruning.base import TARGET_SPARSITY, Finetune, TargetedPruning


class MaskPruning(TargetedPruning):
    """mask → recover → make permanent; a subclass says how the mask is chosen (:meth:`mask`)."""

    def mask(
        self, model: nn.Module, layers: dict[str, nn.Linear], corpus: ByteCorpus, cfg: DictConfig, device: torch.device
    ) -> None:
        """Reparametrise each of ``layers`` with its mask (``prune.custom_from_mask`` or a ``prune`` method)."""
        raise NotImplementedError

    def apply(self, model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, device: torch.device,
              finetune: Finetune | None = None) -> dict[str, float]:
        layers = self.layers(model)
        torch.manual_seed(cfg.trainer.seed)
        self.mask(model, layers, corpus, cfg, device)
        out = self.recover(model, cfg, finetune)
        for m in layers.values():
            prune.remove(m, "weight")
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        out[TARGET_SPARSITY] = zeros / sum(m.weight.numel() for m in layers.values())
        return out
