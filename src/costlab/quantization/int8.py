"""``int8_dynamic`` and ``int8_weight_only``: int8 per-channel weights, on CPU and GPU.

``backend`` picks the kernels: ``torchao`` (``quantize_``), ``pytorch`` (PyTorch's dynamic int8 Linear,
CPU only, :mod:`costlab.quantization.pytorch_int8`), or ``auto``: on a CPU run in fp32, a short probe
times both on the model's own layer shapes and the faster one is used; elsewhere torchao. The run
logs the backend that ran (``quantization/backend``), the engine, and the probe's timings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from costlab.compression import DEFAULT_TARGETS
from costlab.quantization.base import BACKEND_TAG, LAYERS, TorchaoQuantization
from costlab.schema import ConfigError

if TYPE_CHECKING:
    from torch import nn

BACKENDS = ("auto", "torchao", "pytorch")
ENGINE_TAG = "quantization/engine"
PROBE = "quantization/probe_ms_"  # + float, torchao, pytorch: the probe's milliseconds per forward
PROBE_MAX_TOKENS = 512  # rows of the probe's input: the inference batch, capped so the probe stays short


class Int8Dynamic(TorchaoQuantization):
    """``quantization=int8_dynamic``: int8 weights and int8 per-token activations quantized on the fly;
    integer matmuls."""

    def __init__(self, name: str, targets: Any = DEFAULT_TARGETS, backend: str = "auto", engine: str = "x86"):
        super().__init__(name, targets)
        self.backend = backend
        self.engine = engine

    def config(self) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()

    def pytorch_possible(self, cfg: DictConfig) -> str | None:
        """Why PyTorch's kernels cannot run this config, or None when they can."""
        if cfg.trainer.device != "cpu":
            return f"PyTorch's dynamic int8 Linear runs on CPU only; this run is on {cfg.trainer.device}"
        if cfg.precision.get("autocast_dtype"):
            return f"PyTorch's dynamic int8 Linear takes fp32 activations; this run is precision={cfg.precision.name}"
        return None

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError("quantization.backend", self.backend, "choose auto, torchao or pytorch")
        if self.backend != "pytorch":
            super().check(cfg, linears)
            return
        self.targeted(cfg, linears)
        why = self.pytorch_possible(cfg)
        if why:
            raise ConfigError("quantization.backend", self.backend, f"{why}; use quantization.backend=torchao")
        from costlab.quantization.pytorch_int8 import supported_engines

        if self.engine not in supported_engines():
            raise ConfigError("quantization.engine", self.engine,
                              f"this PyTorch build supports {', '.join(supported_engines()) or 'no int8 engine'}")

    def apply(self, model: nn.Module, cfg: DictConfig) -> dict[str, float]:
        out: dict[str, float] = {}
        backend = self.backend
        if backend == "auto":
            if self.pytorch_possible(cfg) is None and self.engine in _engines():
                out = self.probe(model, cfg)
                backend = min(("torchao", "pytorch"), key=lambda b: out[PROBE + b])
            else:
                backend = "torchao"
        if backend == "torchao":
            out.update(super().apply(model, cfg))
            return out
        from costlab.quantization.pytorch_int8 import convert

        self.tags = {BACKEND_TAG: backend, ENGINE_TAG: self.engine}
        out[LAYERS] = convert(model, self.layers(model), self.engine)
        return out

    def probe(self, model: nn.Module, cfg: DictConfig) -> dict[str, float]:
        """Milliseconds per forward of the targeted layers: float, torchao and PyTorch's kernels."""
        import torch
        from torchao.quantization import quantize_

        from costlab.quantization.pytorch_int8 import probe_ms, quantize_linear

        def torchao(lin: nn.Linear) -> nn.Module:
            with torch.no_grad():
                quantize_(lin, self.config())
            return lin

        def pytorch(lin: nn.Linear) -> nn.Module:
            torch.backends.quantized.engine = self.engine
            return quantize_linear(lin)

        tokens = min(PROBE_MAX_TOKENS, cfg.trainer.infer_batch_size * cfg.model.block_size)
        timings = probe_ms(self.layers(model), tokens, {"float": lambda lin: lin, "torchao": torchao,
                                                       "pytorch": pytorch})
        return {PROBE + k: v for k, v in timings.items()}


def _engines() -> list[str]:
    from costlab.quantization.pytorch_int8 import supported_engines

    return supported_engines()


class Int8WeightOnly(TorchaoQuantization):
    """``quantization=int8_weight_only``: int8 weights, float activations (torchao's kernels: PyTorch has no
    fast int8 weight-only Linear for CPU: its ``_weight_int8pack_mm`` took ~50x fp32's time on an AVX2 EPYC)."""

    def __init__(self, name: str, targets: Any = DEFAULT_TARGETS, backend: str = "auto"):
        super().__init__(name, targets)
        self.backend = backend

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        if self.backend == "pytorch":
            raise ConfigError("quantization.backend", self.backend, "PyTorch has no fast int8 weight-only Linear; "
                              "use quantization=int8_dynamic for its int8 kernels, or backend=torchao")
        if self.backend not in BACKENDS:
            raise ConfigError("quantization.backend", self.backend, "choose auto or torchao")
        super().check(cfg, linears)

    def config(self) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
