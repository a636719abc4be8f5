"""What every ``pruning`` option is: the interface the launcher and the worker call, ``none``, and the
keys every real option shares (amount, targets, recovery fine-tuning) with their checks.

No torch import at module level: the launcher builds the option to check it, and ``pruning=none`` must
stay free of torch there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, open_dict

from costlab.compression import DEFAULT_TARGETS, check_targets, target_layers
from costlab.schema import ConfigError, non_negative_int, positive_float

if TYPE_CHECKING:
    import torch
    from torch import nn

    from costlab.data import ByteCorpus

# what share of the targeted weights is gone (zeroed, or removed by a structured prune)
TARGET_SPARSITY = "pruning/target_sparsity"
# fine-tunes a model alone, as a config says (its trainer section); returns the final training loss. The
# trainer hands it over (costlab.training.evaluation): a lever does not reach into the training side
Finetune = Callable[["nn.Module", DictConfig], float]


class Pruning:
    """One option of the ``pruning`` group; the constructor's arguments are the option's config keys."""

    active = True

    def __init__(self, name: str):
        self.name = name

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

    def apply(self, model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, device: torch.device,
              finetune: Finetune | None = None) -> dict[str, float]:
        """Prune ``model`` in place (→ recover with ``finetune``, the trainer's loop the caller hands over →
        make permanent); return what it did, measured."""
        return {}

    def accelerate(self, model: nn.Module, cfg: DictConfig) -> dict[str, float]:
        """After the pruned model was saved: swap in kernels that exploit the sparsity, where there are any."""
        return {}


class NoPruning(Pruning):
    """``pruning=none``."""

    active = False


class TargetedPruning(Pruning):
    """An option that removes ``amount`` of the ``targets`` layers' weights, then optionally fine-tunes
    what is left for ``recovery_steps`` with the removed weights held at zero."""

    def __init__(self, name: str, amount: float = 0.5, targets: Any = DEFAULT_TARGETS, recovery_steps: int = 0,
                 recovery_lr: float | None = None):
        super().__init__(name)
        self.amount, self.targets = amount, targets
        self.recovery_steps, self.recovery_lr = recovery_steps, recovery_lr

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
            raise ConfigError("pruning.amount", amount, "must be a fraction in [0, 1)")
        self.targeted(cfg, linears)
        non_negative_int(cfg, "pruning.recovery_steps")
        if self.recovery_lr is not None:
            positive_float(cfg, "pruning.recovery_lr")

    def targeted(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Name -> (out, in) of the configured model's layers this option prunes (checked)."""
        return check_targets(cfg, "pruning.targets", self.targets, linears)

    def layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        return target_layers(model, self.targets)

    def recover(self, model: nn.Module, cfg: DictConfig, finetune: Finetune | None) -> dict[str, float]:
        """Fine-tune on rank 0 alone with the trainer's loop (``finetune``); masks hold through the
        reparametrisation."""
        if not self.recovery_steps:
            return {}
        if finetune is None:
            raise ValueError("pruning.recovery_steps needs the trainer's loop: pass finetune to apply")
        rcfg = copy.deepcopy(cfg)
        with open_dict(rcfg):
            t = rcfg.trainer
            t.lr = float(self.recovery_lr if self.recovery_lr is not None else t.lr * t.min_lr_ratio)
            t.max_steps, t.warmup_steps, t.eval_interval, t.grad_accum_steps = int(self.recovery_steps), 0, 0, 1
            t.seed = t.seed + 1  # batches the main run did not start with
        final_loss = finetune(model, rcfg)
        model.eval()
        return {"pruning/recovery_final_loss": final_loss}
