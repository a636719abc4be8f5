"""What the ``pruning`` and ``quantization`` groups share, so that neither needs the other: how an option
is built from its config node, which ``nn.Linear`` layers it targets, and the launcher-side checks of
those targets and of techniques that act during training.

Importing this module does not import torch: the launcher builds every option to check it, and
``pruning=none quantization=none`` must not cost a torch import there.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from costlab.models.saved import match_targets
from costlab.parallelism.dims import parallel_dims
from costlab.schema import ConfigError

if TYPE_CHECKING:
    from torch import nn

# the transformer blocks' layers (model=mlp: its hidden layers; model=hf: its decoder layers), never the
# embeddings or the head
DEFAULT_TARGETS = ("blocks.*", "c_fc", "c_proj", "hf.*.layers.*")
TRAIN_TIME_PARALLELISM = ("single", "ddp")  # train-time compression needs every rank to hold whole weights


def build_option(group: str, node: DictConfig) -> Any:
    """``hydra.utils.instantiate(node)``, refusing in one line a key the option's class does not take
    (``+pruning.scope=global`` with ``pruning=wanda``) instead of a TypeError from deep in Hydra."""
    from hydra.utils import get_class, instantiate

    name = node.get("name")
    target = node.get("_target_")
    if not target:
        raise ConfigError(group, name, f"conf/{group}/{name}.yaml names no _target_ class")
    keys = inspect.signature(get_class(target)).parameters
    for key in node:
        if key != "_target_" and key not in keys:
            raise ConfigError(f"{group}.{key}", node[key], f"not a key of {group}={name}; it takes "
                              f"{', '.join(keys)}")
    return instantiate(node)


def target_layers(model: nn.Module, targets: Any) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers whose names match ``targets`` (glob patterns), in model order."""
    from torch import nn

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {n: linears[n] for n in match_targets(list(linears), targets)}


def check_targets(cfg: DictConfig, key: str, value: Any, linears: dict[str, tuple[int, int]]) -> dict:
    """Linear layer name -> (out, in) of the layers ``value`` targets; refuse patterns that match nothing."""
    if not (isinstance(value, str) or OmegaConf.is_list(value) or isinstance(value, list)) or not value:
        raise ConfigError(key, value, "must be a glob pattern over Linear layer names, or a list of them")
    found = match_targets(list(linears), value)
    if not found:
        some = ", ".join(list(linears)[:3])
        raise ConfigError(key, value, f"matches no Linear layer of model={cfg.model.name} (it has {some}, ...)")
    return {n: linears[n] for n in found}


def require_train_time(cfg: DictConfig, key: str, value: Any, what: str) -> None:
    """Refuse a train-time technique under a parallelism whose ranks hold only slices of the weights."""
    dims = parallel_dims(cfg.parallelism, cfg.trainer.nnodes * cfg.trainer.nproc_per_node)
    if dims.fsdp_enabled or dims.tp_enabled or dims.pp_enabled:
        raise ConfigError(key, value, f"{what} runs during training, on whole weights; it supports parallelism="
                          f"{' or '.join(TRAIN_TIME_PARALLELISM)}, not {cfg.parallelism.name}")
