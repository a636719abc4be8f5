"""The ``precision`` group: autocast dtype and loss scaling for training and inference, and fp8 training
(torchao ``Float8Linear`` in the blocks) — what each option needs, checks and does, in one place.

No torch import at module level: the launcher asks an option what it needs and checks it before any rank
starts, and must not pay for torch to do so.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from costlab.schema import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

FP8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada, Hopper and later
FP8_WIDTH_MULTIPLE = 16  # float8 matmuls need widths divisible by this (per rank, under tensor parallel)
MATMUL_DTYPE = {"bfloat16": "bf16", "float16": "fp16", None: "fp32"}


def trains_in_float8(cfg: DictConfig) -> bool:
    """Whether the blocks' Linear layers train in float8 (``precision=fp8``)."""
    return bool(cfg.precision.get("float8", False))


def matmul_dtype(cfg: DictConfig) -> str:
    """The dtype the run's matmuls mostly run in: fp8 when fp8 training converts the Linears, else the
    autocast dtype, else fp32 (the dtype whose datasheet peak MFU is measured against)."""
    if trains_in_float8(cfg):
        return "fp8"
    return MATMUL_DTYPE.get(cfg.precision.get("autocast_dtype"), "fp32")


def check(cfg: DictConfig, tp: int, pp_enabled: bool, block_widths: Callable[[], tuple[int, int] | None],
          hf: bool) -> None:
    """Refuse, in the launcher, what the precision option cannot do here. ``tp``: the tensor-parallel
    degree; ``block_widths``: the model's (width, MLP width) when it has transformer blocks, else None
    (a call: the shapes cost a torch import, which only fp8 needs)."""
    pr = cfg.precision
    if trains_in_float8(cfg):
        _check_fp8(cfg, tp, block_widths, hf)
    if pr.get("grad_scaler", False) and pp_enabled:
        raise ConfigError(
            "precision", pr.name, "parallelism=pp cannot use fp16's GradScaler: each stage would skip overflowing "
            "steps on its own and the stages would drift apart; use precision=bf16",
        )


def _check_fp8(cfg: DictConfig, tp: int, block_widths: Callable[[], tuple[int, int] | None], hf: bool) -> None:
    from costlab.measure.machine import require_gpu

    if cfg.get("mode", "train") == "plan":  # a plan runs nothing here: the card it names must have fp8 matmuls
        peaks = cfg.hardware.get("peak_tflops") or {}
        if peaks.get("fp8") is None:
            raise ConfigError("precision", "fp8", f"hardware={cfg.hardware.name} names no fp8 peak to plan with "
                              "(fp8 matmuls need SM89+: l4, h100_sxm, h100_pcie, h200)")
        if hf:  # planned as torchao float8 training of every decoder layer's Linears would run
            return
    elif hf:
        raise ConfigError("precision", cfg.precision.name, "model=hf trains in fp32, bf16 or fp16 "
                          "(mode=plan plans fp8 for it on a card that has fp8)")
    else:
        require_gpu("precision", "fp8", cfg, FP8_CAPABILITY, "torchao float8 training")
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("precision", "fp8", "needs torchao: pip install 'costlab[quant]'")
    widths = block_widths()
    if widths is None:
        raise ConfigError("precision", "fp8", f"converts the Linear layers of transformer blocks; "
                          f"model={cfg.model.name} has none")
    for what, width in zip(("model.n_embd", "the MLP width"), widths, strict=True):
        if (width // tp) % FP8_WIDTH_MULTIPLE:
            raise ConfigError("precision", "fp8", f"float8 matmuls need widths divisible by {FP8_WIDTH_MULTIPLE} "
                              f"per rank; {what} is {width} over {tp} rank(s)")


def apply_fp8(model: nn.Module, cfg: DictConfig) -> None:
    """Swap the blocks' ``nn.Linear`` layers for torchao ``Float8Linear`` (dynamic scaling, the option's
    ``recipe``). Embeddings, norms and the output head stay in high precision, as torchtitan leaves them
    (the launcher has refused fp8 without an SM89+ GPU)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # optional: the quant extra

    config = Float8LinearConfig.from_recipe_name(cfg.precision.get("recipe", "tensorwise"))
    convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, fqn: fqn.startswith("blocks."))


def autocast_dtype(cfg: DictConfig) -> torch.dtype | None:
    import torch

    name = cfg.precision.get("autocast_dtype")
    return getattr(torch, name) if name else None


def autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass; a no-op in fp32."""
    import torch

    dtype = autocast_dtype(cfg)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(cfg: DictConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not."""
    import torch

    if not cfg.precision.get("grad_scaler", False):
        return None
    return torch.amp.GradScaler(device.type)
