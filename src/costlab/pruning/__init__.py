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

from omegaconf import DictConfig

from costlab import compression
from costlab.pruning.base import NoPruning, Pruning, TargetedPruning

__all__ = ["NoPruning", "Pruning", "TargetedPruning", "build_pruning"]


def build_pruning(cfg: DictConfig) -> Pruning:
    """The ``pruning`` option of ``cfg``: ``hydra.utils.instantiate(cfg.pruning)``."""
    return compression.build_option("pruning", cfg.pruning)

