"""The ``precision`` group: autocast dtype and loss scaling for training and inference."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def autocast_dtype(cfg: DictConfig) -> torch.dtype | None:
    name = cfg.precision.get("autocast_dtype")
    return DTYPES[name] if name else None


def autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass; a no-op in fp32."""
    dtype = autocast_dtype(cfg)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(cfg: DictConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not."""
    if not cfg.precision.get("grad_scaler", False):
        return None
    return torch.amp.GradScaler(device.type)
