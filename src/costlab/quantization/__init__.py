"""The ``quantization`` group: one class per option, named by ``_target_`` in
``conf/quantization/<option>.yaml`` and built with ``hydra.utils.instantiate``; its constructor's
arguments are the option's keys.

    none                                base.py    NoQuantization
    int8_dynamic, int8_weight_only      int8.py    Int8Dynamic, Int8WeightOnly
    int4_weight_only (CUDA SM80+)       int4.py    Int4WeightOnly
    fp8 (CUDA SM89+)                    fp8.py     Fp8
    qat_int8                            qat.py     QatInt8

Each option owns its launcher checks (``check``), its train-time hook (QAT), the step that makes a
train-time-prepared model the float reference again (``reference``), and its action (``apply``, torchao
``quantize_`` on the targeted ``nn.Linear`` layers, shared in ``base.TorchaoQuantization``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from costlab.compression import build_option
from costlab.quantization.base import NoQuantization, Quantization, TorchaoQuantization

__all__ = ["NoQuantization", "Quantization", "TorchaoQuantization", "build_quantization"]


def build_quantization(cfg: DictConfig) -> Quantization:
    """The ``quantization`` option of ``cfg``: ``hydra.utils.instantiate(cfg.quantization)``."""
    return build_option("quantization", cfg.quantization)

