"""The ``finetune`` group: which parameters train. ``full``: all of them; ``lora``: PEFT's LoRA adapters
injected into the targeted Linear layers of the model as it is (costlab's GPTs and Hugging Face models
alike: the module tree keeps its classes, so every layout's code finds its blocks), every other parameter
frozen. The shipped model has the adapters merged into its weights (:func:`merge_adapters`), so it is a
plain model of the run's ``model`` config, which every compression option, ``costlab.use`` and a reload
take as they take any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from costlab.schema import group_node

if TYPE_CHECKING:  # torch is imported by the ranks; the launcher asks uses_adapters() without it
    from torch import nn

LORA = "costlab.models.adapters.lora"


def uses_adapters(cfg: DictConfig) -> bool:
    return group_node(cfg, "finetune").get("_target_") == LORA


def apply_finetune(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """``model`` as the ``finetune`` option trains it: the option's ``_target_`` called on it with the option's
    keys (:func:`full`, :func:`lora`)."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    node = group_node(cfg, "finetune")
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(node, dict)
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "name")}
    return get_object(str(node["_target_"]))(model, **kwargs)


def full(model: nn.Module) -> nn.Module:
    """Every parameter trains: the model as it is."""
    return model


def lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
         targets: Sequence[str] = (), merge: bool = True) -> nn.Module:
    """PEFT's LoRA adapters (``LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
    target_modules=targets)``) injected into ``model`` in place, every other parameter frozen. ``merge``: the
    shipped model has them merged (:func:`merge_adapters`, called where the shipped model is made)."""
    from peft import LoraConfig, inject_adapter_in_model  # optional: the finetune extra

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter into its base layer and put the base layer back in its place (in place, as
    PEFT's ``merge_and_unload`` does for a ``PeftModel``); the model's parameters train again, as a loaded model's
    do. A model without adapters is returned as it is."""
    from peft.tuners.lora import LoraLayer

    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if adapted:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def trainable_params(model: nn.Module) -> int:
    """Parameters that train (tied ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
