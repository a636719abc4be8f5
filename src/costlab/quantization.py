"""The ``quantization`` group: torchao ``quantize_`` on the targeted ``nn.Linear`` layers.

The weights become torchao tensor subclasses (int8 / int4 / float8 data plus scales); they stay so in
the saved state dict, which is why the file on disk shrinks. ``qat_int8`` trains with fake
quantization for the last ``qat_steps`` steps, then converts to the same int8 kernels as
``int8_dynamic``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from costlab.pruning import target_layers

GPU_ONLY = {"int4_weight_only": (8, 0), "fp8": (8, 9)}  # minimum CUDA compute capability
BF16_KERNELS = ("int4_weight_only", "fp8")  # tinygemm int4 and rowwise fp8 matmuls take bf16


def is_active(cfg: DictConfig) -> bool:
    return cfg.quantization.name != "none"


def ptq_config(cfg: DictConfig):
    """The torchao config that turns a float model into the quantized one."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        MappingType,
        PerRow,
    )

    name = cfg.quantization.name
    if name == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if name == "qat_int8":  # asymmetric per-token activations: what QAT's fake quantizer simulates
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)
    if name == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if name == "int4_weight_only":
        # tinygemm's packed layout runs on torch's own CUDA kernel (no fbgemm-gpu needed)
        group = int(cfg.quantization.group_size)
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    if name == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"unknown quantization option {name}")


def _only(names: set[str]) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn in names


@torch.no_grad()
def apply(model: nn.Module, cfg: DictConfig) -> dict[str, float]:
    """Quantize the targeted layers of ``model`` in place; return how many were quantized."""
    from torchao.quantization import quantize_

    layers = target_layers(model, cfg.quantization.targets)
    if cfg.quantization.name in BF16_KERNELS:
        for m in layers.values():
            m.to(torch.bfloat16)
    quantize_(model, ptq_config(cfg), filter_fn=_only(set(layers)))
    # torchao leaves a layer float when its shape does not fit the scheme; count what really changed
    done = sum(type(m.weight) not in (torch.Tensor, nn.Parameter) for m in layers.values())
    return {"quantization/layers": done}


# --- quantization-aware training --------------------------------------------------------------------


def _qat_prepare_config():
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    # int8 per-token activations (torchao's fake quantizer only does them asymmetric) and
    # int8 per-channel symmetric weights: the numerics of the int8 kernels the model ends with
    return QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare",
    )


def training_hook(model: nn.Module, cfg: DictConfig) -> Callable[[int], None] | None:
    """For ``qat_int8``: swap in fake-quantized Linear layers now (before any wrapper sees the model),
    switched off; the returned hook switches them on for the last ``qat_steps`` steps."""
    if cfg.quantization.name != "qat_int8":
        return None
    from torchao.quantization import quantize_
    from torchao.quantization.qat.linear import FakeQuantizedLinear, enable_linear_fake_quant

    layers = target_layers(model, cfg.quantization.targets)
    quantize_(model, _qat_prepare_config(), filter_fn=_only(set(layers)))
    fake = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    for m in fake:
        enable_linear_fake_quant(m, False)
    first = cfg.trainer.max_steps - int(cfg.quantization.qat_steps)

    def hook(step: int) -> None:
        if step == first:
            for m in fake:
                enable_linear_fake_quant(m, True)

    return hook


def strip_fake_quant(model: nn.Module) -> int:
    """Swap fake-quantized layers back to plain ``nn.Linear`` (same weights); return how many."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    n = sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    if n:
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return n
