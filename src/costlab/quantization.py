"""The ``quantization`` group."""

from __future__ import annotations

from omegaconf import DictConfig


def is_active(cfg: DictConfig) -> bool:
    return cfg.quantization.name != "none"
