"""``l1_unstructured``, ``random_unstructured`` and ``ln_structured``: exactly what ``torch.nn.utils.prune``
makes, once after training or gradually during it (``schedule=gradual``, Zhu & Gupta 2017)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from costlab.compression import require_train_time
from costlab.data import ByteCorpus
from costlab.pruning.base import DEFAULT_TARGETS
from costlab.pruning.masks import MaskPruning
from costlab.schema import ConfigError, non_negative_int, positive_float, positive_int

Scores = Callable[[str, nn.Linear], torch.Tensor]


def cubic_sparsity(step: int, amount: float, start: int, end: int) -> float:
    """s_t = s_f · (1 − (1 − (t − t0)/(t1 − t0))³), flat at 0 before t0 and at s_f after t1."""
    progress = min(1.0, max(0.0, (step - start) / max(1, end - start)))
    return amount * (1 - (1 - progress) ** 3)


class ScheduledPruning(MaskPruning):
    """A ``torch.nn.utils.prune`` method, applied once (``oneshot``) or ramped up during training (``gradual``:
    cubic from 0 at ``start_step`` to ``amount`` at ``end_step``, masks updated every ``frequency`` steps)."""

    def __init__(self, name: str, amount: float = 0.5, targets: Any = DEFAULT_TARGETS, schedule: str = "oneshot",
                 start_step: int = 0, end_step: int | None = None, frequency: int = 10, recovery_steps: int = 0,
                 recovery_lr: float | None = None):
        super().__init__(name, amount, targets, recovery_steps, recovery_lr)
        self.schedule, self.start_step, self.end_step, self.frequency = schedule, start_step, end_step, frequency

    @property
    def acts_during_training(self) -> bool:
        return self.schedule == "gradual"

    # --- what a subclass says ---

    def oneshot(self, layers: dict[str, nn.Linear]) -> None:
        """Reparametrise ``layers`` with the method's masks for ``amount``."""
        raise NotImplementedError

    def rank(self, scores: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
        """Keep-masks (bool) that drop ``amount`` by the method's rule, given each layer's scores."""
        raise NotImplementedError

    def scores(self, layers: dict[str, nn.Linear], cfg: DictConfig) -> Scores:
        """What the gradual masks rank: the weights themselves unless a subclass says otherwise."""
        return lambda name, m: m.weight.detach().float()

    # --- the schedule ---

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        t = cfg.trainer
        if self.schedule not in ("oneshot", "gradual"):
            raise ConfigError("pruning.schedule", self.schedule, "choose oneshot or gradual")
        if self.schedule != "gradual":
            return
        if t.max_steps == 0:
            raise ConfigError("pruning.schedule", self.schedule, "prunes during training, and trainer.max_steps=0")
        require_train_time(cfg, "pruning.schedule", self.schedule, "gradual pruning")
        start = non_negative_int(cfg, "pruning.start_step")
        end = t.max_steps if self.end_step is None else non_negative_int(cfg, "pruning.end_step")
        if not start < end <= t.max_steps:
            raise ConfigError("pruning.end_step", self.end_step, f"need pruning.start_step={start} < end_step <= "
                              f"trainer.max_steps={t.max_steps}")
        positive_int(cfg, "pruning.frequency")

    def mask(
        self, model: nn.Module, layers: dict[str, nn.Linear], corpus: ByteCorpus, cfg: DictConfig, device: torch.device
    ) -> None:
        if self.schedule == "gradual":  # the training hook left the zeros in place
            for m in layers.values():
                prune.custom_from_mask(m, "weight", m.weight.detach() != 0)
        else:
            self.oneshot(layers)

    def training_hook(self, model: nn.Module, cfg: DictConfig) -> Callable[[int], None] | None:
        """For ``schedule=gradual``: the hook the trainer calls before each step (and once after the last).

        Masks only grow (pruned weights score 0), and are multiplied in before every step because the
        optimizer revives pruned weights. Weights are replicated (single, ddp), so every rank computes
        the same masks from the same weights.
        """
        if self.schedule != "gradual":
            return None
        layers = self.layers(model)
        start = int(self.start_step)
        end = int(self.end_step if self.end_step is not None else cfg.trainer.max_steps)
        score = self.scores(layers, cfg)
        masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}

        @torch.no_grad()
        def hook(step: int) -> None:
            if start <= step <= end and ((step - start) % self.frequency == 0 or step == end):
                amount = cubic_sparsity(step, float(self.amount), start, end)
                masks.update(self.rank({n: score(n, m) * masks[n] for n, m in layers.items()}, amount))
            for n, m in layers.items():
                m.weight.mul_(masks[n])

        return hook


def _l1_keep(scores: torch.Tensor, amount: float) -> torch.Tensor:
    return prune.L1Unstructured(amount).compute_mask(scores, torch.ones_like(scores)).bool()


class L1Unstructured(ScheduledPruning):
    """``pruning=l1_unstructured``: zero the smallest |w|, in each layer (``scope=local``) or over all the
    targeted layers together (``scope=global``)."""

    method = prune.L1Unstructured

    def __init__(self, name: str, amount: float = 0.5, targets: Any = DEFAULT_TARGETS,
                 scope: str = "local", schedule: str = "oneshot", start_step: int = 0, end_step: int | None = None,
                 frequency: int = 10, recovery_steps: int = 0, recovery_lr: float | None = None):
        super().__init__(name, amount, targets, schedule, start_step, end_step, frequency, recovery_steps,
                         recovery_lr)
        self.scope = scope

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        if self.scope not in ("local", "global"):
            raise ConfigError("pruning.scope", self.scope, "choose local or global")

    def oneshot(self, layers: dict[str, nn.Linear]) -> None:
        amount = float(self.amount)
        if self.scope == "global":
            prune.global_unstructured([(m, "weight") for m in layers.values()], self.method, amount=amount)
        else:
            for m in layers.values():
                self.method.apply(m, "weight", amount=amount)

    def rank(self, scores: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
        if self.scope == "local":
            return {n: _l1_keep(s, amount) for n, s in scores.items()}
        flat = _l1_keep(torch.cat([s.flatten() for s in scores.values()]), amount)
        parts = flat.split([s.numel() for s in scores.values()])
        return {n: part.view_as(s) for (n, s), part in zip(scores.items(), parts, strict=True)}


class RandomUnstructured(L1Unstructured):
    """``pruning=random_unstructured``: zero a random ``amount``, the baseline any importance score must beat."""

    method = prune.RandomUnstructured

    def scores(self, layers: dict[str, nn.Linear], cfg: DictConfig) -> Scores:
        # fixed random scores, so the growing mask is a nested random subset
        g = torch.Generator().manual_seed(cfg.trainer.seed)
        rand = {n: torch.rand(m.weight.shape, generator=g).to(m.weight.device) for n, m in layers.items()}
        return lambda name, m: rand[name]


class LnStructured(ScheduledPruning):
    """``pruning=ln_structured``: zero whole output rows (``dim=0``) or input columns (``dim=1``) of each layer
    by their L-``n`` norm. Shapes stay the same; ``structured`` removes units instead."""

    def __init__(self, name: str, amount: float = 0.3, targets: Any = DEFAULT_TARGETS,
                 n: float = 2, dim: int = 0, schedule: str = "oneshot", start_step: int = 0,
                 end_step: int | None = None, frequency: int = 10, recovery_steps: int = 0,
                 recovery_lr: float | None = None):
        super().__init__(name, amount, targets, schedule, start_step, end_step, frequency, recovery_steps,
                         recovery_lr)
        self.n, self.dim = n, dim

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        positive_float(cfg, "pruning.n")
        if self.dim not in (0, 1):
            raise ConfigError("pruning.dim", self.dim, "0 prunes output rows, 1 input columns")

    def oneshot(self, layers: dict[str, nn.Linear]) -> None:
        for m in layers.values():
            prune.ln_structured(m, "weight", amount=float(self.amount), n=self.n, dim=self.dim)

    def rank(self, scores: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
        method = prune.LnStructured(amount, n=self.n, dim=self.dim)
        return {n: method.compute_mask(s, torch.ones_like(s)).bool() for n, s in scores.items()}
