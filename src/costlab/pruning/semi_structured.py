"""``pruning=semi_structured``: the 2:4 pattern, where every 4 consecutive input weights of a row keep their 2
largest |w|. On CUDA SM80+ the saved model's weights then become ``to_sparse_semi_structured`` tensors and
the cuSPARSELt/CUTLASS kernels run; elsewhere only ``allow_mask_only=true`` is accepted, and then the
zeros stay in dense tensors and no speed-up is claimed."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune
from torch.sparse import to_sparse_semi_structured

from costlab.data import ByteCorpus
from costlab.measure.machine import require_gpu
from costlab.precision import autocast_dtype
from costlab.pruning.base import DEFAULT_TARGETS
from costlab.pruning.masks import MaskPruning
from costlab.quantization import build_quantization
from costlab.schema import ConfigError


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs of each row (the 2:4 pattern)."""
    out, inp = weight.shape
    groups = weight.detach().abs().reshape(out, inp // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)


class SemiStructured(MaskPruning):
    def __init__(self, name: str, amount: float = 0.5, targets: Any = DEFAULT_TARGETS, allow_mask_only: bool = False,
                 recovery_steps: int = 0, recovery_lr: float | None = None):
        super().__init__(name, amount, targets, recovery_steps, recovery_lr)
        self.allow_mask_only = allow_mask_only

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        if self.amount != 0.5:
            raise ConfigError("pruning.amount", self.amount, "semi_structured is the 2:4 pattern, so exactly 0.5")
        layers = self.targeted(cfg, linears)
        for name, (_, inp) in layers.items():
            if inp % 4:
                raise ConfigError("pruning.targets", self.targets, f"2:4 needs input widths divisible by 4; "
                                  f"{name} has {inp}")
        if not isinstance(self.allow_mask_only, bool):
            raise ConfigError("pruning.allow_mask_only", self.allow_mask_only, "must be true or false")
        if self.allow_mask_only:
            return
        require_gpu("pruning", self.name, cfg, (8, 0),
                    "2:4 sparse kernels; pruning.allow_mask_only=true keeps the masks without a speed-up")
        if cfg.precision.get("autocast_dtype") not in ("float16", "bfloat16"):
            raise ConfigError("precision", cfg.precision.name, "the 2:4 sparse kernels take fp16/bf16; use "
                              "precision=bf16 or fp16 with pruning=semi_structured")
        for name, (out, inp) in layers.items():
            if out % 32 or inp % 64:
                raise ConfigError("pruning.targets", self.targets, f"2:4 kernels need (out, in) multiples of "
                                  f"(32, 64); {name} is ({out}, {inp})")
        if build_quantization(cfg).active:
            raise ConfigError("quantization", cfg.quantization.name, "does not combine with the 2:4 sparse "
                              "kernels; use pruning.allow_mask_only=true to quantize a 2:4-masked model")

    def mask(
        self, model: nn.Module, layers: dict[str, nn.Linear], corpus: ByteCorpus, cfg: DictConfig, device: torch.device
    ) -> None:
        for m in layers.values():
            prune.custom_from_mask(m, "weight", two_four_mask(m.weight))

    @torch.no_grad()
    def accelerate(self, model: nn.Module, cfg: DictConfig) -> dict[str, float]:
        """Turn the 2:4 weights into sparse tensors the kernels run. They take fp16/bf16 only, so these layers
        move to the run's autocast dtype. 0 layers when only masks were asked for: no speed-up claimed."""
        layers = {} if self.allow_mask_only else self.layers(model)
        dtype = autocast_dtype(cfg)
        for m in layers.values():
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach().to(dtype).contiguous()), False)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        return {"pruning/sparse_kernel_layers": len(layers)}
