"""``quantization=fp8``: float8 e4m3 weights and activations with per-row scales, on CUDA SM89+ in bf16."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from costlab.quantization.base import TorchaoQuantization
from costlab.schema import ConfigError


class Fp8(TorchaoQuantization):
    capability = (8, 9)
    kernels = "float8 tensor cores"
    bf16_kernels = True  # the rowwise float8 matmul takes bf16

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        for name, (out, inp) in self.targeted(cfg, linears).items():
            if out % 16 or inp % 16:
                raise ConfigError("quantization.targets", self.targets, f"float8 matmuls need widths divisible "
                                  f"by 16; {name} is ({out}, {inp})")

    def config(self) -> Any:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
