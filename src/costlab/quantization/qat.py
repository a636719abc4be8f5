"""``quantization=qat_int8``: quantization-aware training (torchao ``QATConfig``). The targeted layers train
with int8 fake quantization for the last ``qat_steps`` steps; the float model they end with is the
reference, which then converts to the int8 kernels of ``int8_dynamic``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from costlab.compression import DEFAULT_TARGETS, require_train_time
from costlab.quantization.base import TorchaoQuantization, only
from costlab.schema import ConfigError, positive_int


class QatInt8(TorchaoQuantization):
    def __init__(self, name: str, targets: Any = DEFAULT_TARGETS, qat_steps: int = 50):
        super().__init__(name, targets)
        self.qat_steps = qat_steps

    @property
    def acts_during_training(self) -> bool:
        return True

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        steps = positive_int(cfg, "quantization.qat_steps")
        if steps > cfg.trainer.max_steps:
            raise ConfigError("quantization.qat_steps", steps, f"exceeds trainer.max_steps={cfg.trainer.max_steps}: "
                              "QAT fake-quantizes the last qat_steps training steps")
        require_train_time(cfg, "quantization", self.name, "quantization-aware training")

    def config(self) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType

        # asymmetric per-token activations: what the fake quantizer simulated
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)

    def training_hook(self, model: nn.Module, cfg: DictConfig) -> Callable[[int], None] | None:
        """Swap in fake-quantized Linear layers now (before any wrapper sees the model), switched off; the
        returned hook switches them on for the last ``qat_steps`` steps."""
        from torchao.quantization import quantize_
        from torchao.quantization.qat.linear import FakeQuantizedLinear, enable_linear_fake_quant

        quantize_(model, _prepare_config(), filter_fn=only(set(self.layers(model))))
        fake = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
        for m in fake:
            enable_linear_fake_quant(m, False)
        first = cfg.trainer.max_steps - int(self.qat_steps)

        def hook(step: int) -> None:
            if step == first:
                for m in fake:
                    enable_linear_fake_quant(m, True)

        return hook

    def reference(self, model: nn.Module) -> dict[str, float]:
        return {"quantization/qat_steps": self.qat_steps} if strip_fake_quant(model) else {}


def _prepare_config() -> Any:
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    # int8 per-token activations (torchao's fake quantizer only does them asymmetric) and
    # int8 per-channel symmetric weights: the numerics of the int8 kernels the model ends with
    return QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare",
    )


def strip_fake_quant(model: nn.Module) -> int:
    """Swap fake-quantized layers back to plain ``nn.Linear`` (same weights); return how many."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    n = sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    if n:
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return n
