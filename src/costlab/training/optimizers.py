"""The ``optimizer`` group on the rank's side: the option's constructor, called with the trainer's parameter
groups, learning rate and (where it takes them) betas and weight decay."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from costlab.schema import group_node


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """The ``optimizer`` option's constructor over the parameters that train: matrices decay, vectors (norms,
    biases) do not, as in nanoGPT; ``trainer.lr``, and ``trainer.betas`` / ``trainer.weight_decay`` where the
    constructor has those arguments (SGD has no betas)."""
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.trainer
    node = group_node(cfg, "optimizer")
    option = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(option, dict)
    cls = get_class(str(option.pop("_target_")))
    option.pop("name", None)
    accepts = inspect.signature(cls).parameters
    decay = t.weight_decay if "weight_decay" in accepts else 0.0
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": t.lr, **option}
    if "betas" in accepts:
        kwargs["betas"] = tuple(t.betas)
    return cls(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: in place where the optimizer holds it as a tensor (torchao's, whose
    compiled update reads it without recompiling)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
