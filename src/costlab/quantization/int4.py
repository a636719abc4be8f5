"""``quantization=int4_weight_only``: int4 weights in groups of ``group_size``, bf16 activations, on CUDA SM80+."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from costlab.compression import DEFAULT_TARGETS
from costlab.quantization.base import TorchaoQuantization
from costlab.schema import ConfigError

GROUP_SIZES = (32, 64, 128, 256)


class Int4WeightOnly(TorchaoQuantization):
    capability = (8, 0)
    kernels = "tinygemm int4 kernels"
    bf16_kernels = True  # tinygemm's int4 matmul takes bf16

    def __init__(self, name: str, targets: Any = DEFAULT_TARGETS, group_size: int = 128):
        super().__init__(name, targets)
        self.group_size = group_size

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        group = self.group_size
        if group not in GROUP_SIZES:
            raise ConfigError("quantization.group_size", group, "choose 32, 64, 128 or 256")
        for name, (_, inp) in self.targeted(cfg, linears).items():
            if inp % group:
                raise ConfigError("quantization.group_size", group, f"must divide every targeted input width; "
                                  f"{name} has {inp}")

    def config(self) -> Any:
        from torchao.quantization import Int4WeightOnlyConfig

        # tinygemm's packed layout runs on torch's own CUDA kernel (no fbgemm-gpu needed)
        return Int4WeightOnlyConfig(group_size=int(self.group_size), int4_packing_format="tile_packed_to_4d")
