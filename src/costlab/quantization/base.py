"""What every ``quantization`` option is: the interface the launcher and the worker call, ``none``, and the
torchao ``quantize_`` step every real option shares.

No torch import at module level: the launcher builds the option to check it, and ``quantization=none``
must stay free of torch there; torchao is optional (``costlab[quant]``) and imported only to quantize.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from costlab.compression import DEFAULT_TARGETS, check_targets, target_layers
from costlab.measure.machine import require_gpu
from costlab.schema import ConfigError

if TYPE_CHECKING:
    from torch import nn


BACKEND_TAG = "quantization/backend"  # the run's tag naming the kernels that ran
LAYERS = "quantization/layers"  # metric: how many layers were really quantized


class Quantization:
    """One option of the ``quantization`` group; the constructor's arguments are the option's config keys."""

    active = True

    def __init__(self, name: str):
        self.name = name
        self.tags: dict[str, str] = {}  # what ``apply`` chose, as the run's tags (the kernels that ran)

    @property
    def acts_during_training(self) -> bool:
        """Whether this option changes the model while it trains (a checkpoint does not hold what it did,
        and the run does not train as its uncompressed twin does)."""
        return False

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        """Refuse, in the launcher, what this option cannot do with ``cfg`` (raises ``ConfigError``).
        ``linears``: Linear layer name -> (out, in) of the configured model."""

    def training_hook(self, model: nn.Module, cfg: DictConfig) -> Callable[[int], None] | None:
        """A hook the trainer calls before each step and once after the last, or None."""
        return None

    def reference(self, model: nn.Module) -> dict[str, float]:
        """Make a model that ``training_hook`` prepared the plain float reference again, before quantizing."""
        return {}

    def apply(self, model: nn.Module, cfg: DictConfig) -> dict[str, float]:
        """Quantize ``model`` in place; return what it did."""
        return {}


class NoQuantization(Quantization):
    """``quantization=none``."""

    active = False


class TorchaoQuantization(Quantization):
    """torchao ``quantize_`` with :meth:`config` on the ``targets`` layers. The weights become torchao tensor
    subclasses (int8 / int4 / float8 data plus scales) and stay so in the saved state dict, which is why
    the file on disk shrinks."""

    capability: tuple[int, int] | None = None  # minimum CUDA compute capability of the kernels; None: CPU too
    kernels = ""  # the GPU kernels that need it, for the refusal
    bf16_kernels = False  # the kernels take bf16 activations: the targeted layers move to bf16 first

    def __init__(self, name: str, targets: Any = DEFAULT_TARGETS):
        super().__init__(name)
        self.targets = targets

    def config(self) -> Any:
        """The torchao config that turns the float layers into quantized ones."""
        raise NotImplementedError

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        self.targeted(cfg, linears)
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("quantization", self.name, "needs torchao: pip install 'costlab[quant]'")
        if self.capability is not None:
            require_gpu("quantization", self.name, cfg, self.capability, self.kernels)
        if self.bf16_kernels and cfg.precision.get("autocast_dtype") != "bfloat16":
            raise ConfigError("precision", cfg.precision.name, f"quantization={self.name} runs bf16 kernels; "
                              "use precision=bf16")

    def targeted(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Name -> (out, in) of the configured model's layers this option quantizes (checked)."""
        return check_targets(cfg, "quantization.targets", self.targets, linears)

    def layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        return target_layers(model, self.targets)

    def apply(self, model: nn.Module, cfg: DictConfig) -> dict[str, float]:
        import torch
        from torchao.quantization import quantize_

        layers = self.layers(model)
        self.tags = {BACKEND_TAG: "torchao"}
        with torch.no_grad():
            if self.bf16_kernels:
                for m in layers.values():
                    m.to(torch.bfloat16)
            quantize_(model, self.config(), filter_fn=only(set(layers)))
        # torchao leaves a layer float when its shape does not fit the scheme; count what really changed
        done = sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in layers.values())
        return {LAYERS: done}


def only(names: set[str]) -> Callable[[nn.Module, str], bool]:
    """A ``quantize_`` filter: the plain Linear layers named in ``names``."""
    from torch import nn

    return lambda module, fqn: isinstance(module, nn.Linear) and fqn in names
