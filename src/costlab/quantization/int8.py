"""``int8_dynamic`` and ``int8_weight_only``: int8 per-channel weights, on CPU and GPU."""

from __future__ import annotations

from typing import Any

from costlab.quantization.base import TorchaoQuantization


class Int8Dynamic(TorchaoQuantization):
    """``quantization=int8_dynamic``: int8 weights and int8 per-token activations quantized on the fly;
    integer matmuls."""

    def config(self) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()


class Int8WeightOnly(TorchaoQuantization):
    """``quantization=int8_weight_only``: int8 weights, float activations."""

    def config(self) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
