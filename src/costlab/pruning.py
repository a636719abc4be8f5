"""The ``pruning`` group."""

from __future__ import annotations

from omegaconf import DictConfig


def is_active(cfg: DictConfig) -> bool:
    return cfg.pruning.name != "none"
