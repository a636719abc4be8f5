"""The ``pruning`` group: one class per option, named by ``_target_`` in ``conf/pruning/<option>.yaml``
and built with ``hydra.utils.instantiate``; its constructor's arguments are the option's keys.

    none                                          base.py            NoPruning
    l1_unstructured, random_unstructured,         unstructured.py    L1Unstructured, RandomUnstructured,
    ln_structured (+ schedule=gradual)                               LnStructured
    wanda                                         wanda.py           Wanda
    semi_structured                               semi_structured.py SemiStructured
    structured                                    structured.py      Structured

Each option owns its launcher checks (``check``), its train-time hook, and its action (``apply``: prune →
recover → make permanent; ``accelerate``: sparse kernels for the saved model). The mask options share
``masks.py``; every option but ``none`` shares the keys and recovery of ``base.TargetedPruning``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from costlab import compression
from costlab.pruning.base import NoPruning, Pruning, TargetedPruning

if TYPE_CHECKING:
    import torch
    from torch import nn

    from costlab.data import ByteCorpus

__all__ = ["NoPruning", "Pruning", "TargetedPruning", "build_pruning"]


def build_pruning(cfg: DictConfig) -> Pruning:
    """The ``pruning`` option of ``cfg``: ``hydra.utils.instantiate(cfg.pruning)``."""
    return compression.build_option("pruning", cfg.pruning)


# --- compatibility wrappers: the worker, evaluation and benchmarks call these until they call the option ---


def is_active(cfg: DictConfig) -> bool:
    return build_pruning(cfg).active


def training_hook(model: nn.Module, cfg: DictConfig) -> Callable[[int], None] | None:
    return build_pruning(cfg).training_hook(model, cfg)


def apply(model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, device: torch.device) -> dict[str, float]:
    return build_pruning(cfg).apply(model, corpus, cfg, device)


def accelerate(model: nn.Module, cfg: DictConfig) -> int:
    return int(build_pruning(cfg).accelerate(model, cfg).get("pruning/sparse_kernel_layers", 0))


def target_layers(model: nn.Module, targets: object) -> dict[str, nn.Linear]:
    return compression.target_layers(model, targets)
