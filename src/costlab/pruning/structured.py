"""``pruning=structured``: physically remove the least important MLP hidden neurons and attention heads, so
the result is a smaller dense model whose parameter count, file size and inference time really drop.

Importance is the magnitude of the unit's path through the layer: ‖row of c_fc‖·‖column of c_proj‖ for a
neuron (times ‖row of c_fc2‖ for SwiGLU), ‖V rows‖·‖output columns‖ for a head. ``model=hf`` (Llama-style
layers): ‖gate row‖·‖up row‖·‖down column‖ for a neuron; under grouped-query attention a key/value head
goes with the query heads that share it, scored by its V rows and their output columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from costlab.data import ByteCorpus
from costlab.pruning.base import DEFAULT_TARGETS, TARGET_SPARSITY, Finetune, TargetedPruning
from costlab.schema import ConfigError, positive_int

PARTS = ("mlp", "attn")
# Kept MLP widths are rounded to a multiple of this: on an AVX2 EPYC (benchmarks/pruned_widths.py, gpt_nano
# and gpt_micro MLPs, 1024 tokens) 16 made each kept neuron ~8 % faster in fp32 and ~12 % in PyTorch's int8
# Linear than odd widths (geometric mean over amounts 0.1-0.7); 8 gained less, 32 and 64 no more in fp32.
DEFAULT_MULTIPLE = 16


class Structured(TargetedPruning):
    def __init__(self, name: str, amount: float = 0.5, parts: Any = PARTS, targets: Any = DEFAULT_TARGETS,
                 recovery_steps: int = 0, recovery_lr: float | None = None, multiple_of: int = DEFAULT_MULTIPLE):
        super().__init__(name, amount, targets, recovery_steps, recovery_lr)
        self.parts = parts
        self.multiple_of = multiple_of

    def check(self, cfg: DictConfig, linears: dict[str, tuple[int, int]]) -> None:
        super().check(cfg, linears)
        positive_int(cfg, "pruning.multiple_of")
        layers = self.targeted(cfg, linears)
        listed = OmegaConf.is_list(self.parts) or isinstance(self.parts, (list, tuple))
        parts = list(self.parts) if listed else [self.parts]
        if not parts or set(parts) - set(PARTS):
            raise ConfigError("pruning.parts", self.parts, "a list of mlp and/or attn")
        mlp = any(".mlp." in n or n in ("c_fc", "c_proj") for n in layers)
        attn = any(".attn." in n or ".self_attn." in n for n in layers)
        if not (("mlp" in parts and mlp) or ("attn" in parts and attn)):
            raise ConfigError("pruning.parts", self.parts, "none of these parts is among pruning.targets")

    def apply(self, model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, device: torch.device,
              finetune: Finetune | None = None) -> dict[str, float]:
        layers = self.layers(model)
        before = sum(m.weight.numel() for m in layers.values())
        torch.manual_seed(cfg.trainer.seed)
        shrink(model, plan_structured(model, layers, float(self.amount), self.parts, int(self.multiple_of)))
        after = sum(m.weight.numel() for m in self.layers(model).values())
        out = self.recover(model, cfg, finetune)
        out[TARGET_SPARSITY] = 1 - after / before  # removed, not zeroed
        return out


def _mlps(model: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    """Modules with a ``c_fc`` → ``c_proj`` hidden layer (a GPT block's MLP, or the mlp model itself)."""
    out = {}
    for n, m in model.named_modules():
        pre = f"{n}." if n else ""
        if isinstance(getattr(m, "c_fc", None), nn.Linear) and isinstance(getattr(m, "c_proj", None), nn.Linear):
            if any(f"{pre}{c}" in names for c in ("c_fc", "c_fc2", "c_proj")):
                out[n] = m
    return out


def _with_linears(model: nn.Module, names: set[str], parts: tuple[str, ...], *attrs: str) -> dict[str, nn.Module]:
    """Modules holding every ``parts`` as an ``nn.Linear`` (and every ``attrs``), one of them targeted."""
    return {n: m for n, m in model.named_modules()
            if all(isinstance(getattr(m, p, None), nn.Linear) for p in parts) and all(hasattr(m, a) for a in attrs)
            and any(f"{n}.{p}" in names for p in parts)}


def _gated_mlps(model: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    """Llama-style MLPs (``down_proj(act(gate_proj(x)) * up_proj(x))``): model=hf."""
    return _with_linears(model, names, ("gate_proj", "up_proj", "down_proj"))


def _grouped_attentions(model: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    """Llama-style attentions with ``num_key_value_groups`` query heads per key/value head: model=hf."""
    return _with_linears(model, names, ("q_proj", "k_proj", "v_proj", "o_proj"), "head_dim", "num_key_value_groups")


def _attentions(model: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(getattr(m, "c_q", None), nn.Linear) and hasattr(m, "head_dim"):
            if any(f"{n}.{c}" in names for c in ("c_q", "c_k", "c_v", "c_proj")):
                out[n] = m
    return out


def kept_count(total: int, amount: float, multiple: int = 1) -> int:
    """How many of ``total`` units stay when ``amount`` of them go, rounded to the nearest multiple of
    ``multiple`` (at least one multiple, at most ``total``; unrounded when ``total`` is below it)."""
    n_keep = max(1, total - round(amount * total))
    if multiple > 1 and total >= multiple:
        n_keep = min(total, max(multiple, multiple * round(n_keep / multiple)))
    return n_keep


def _keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    return scores.topk(n_keep).indices.sort().values


@torch.no_grad()
def plan_structured(
    model: nn.Module, layers: dict[str, nn.Linear], amount: float, parts: Any, multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Module name -> indices to keep: hidden neurons of each MLP, heads of each attention. Kept widths
    are multiples of ``multiple_of`` where the layer is that wide: MLP neurons directly, heads so that
    heads x head_dim is one."""
    names, plan = set(layers), {}
    if "mlp" in parts:
        for n, m in _mlps(model, names).items():
            score = m.c_fc.weight.norm(dim=1) * m.c_proj.weight.norm(dim=0)
            if getattr(m, "c_fc2", None) is not None:
                score = score * m.c_fc2.weight.norm(dim=1)
            plan[n] = _keep(score.float(), kept_count(score.numel(), amount, multiple_of))
    if "mlp" in parts:  # model=hf, Llama-style: gate and up rows with the matching down column
        for n, m in _gated_mlps(model, names).items():
            score = m.gate_proj.weight.norm(dim=1) * m.up_proj.weight.norm(dim=1) * m.down_proj.weight.norm(dim=0)
            plan[n] = _keep(score.float(), kept_count(score.numel(), amount, multiple_of))
    if "attn" in parts:  # model=hf, grouped-query attention: whole key/value groups go, with their query heads
        for n, m in _grouped_attentions(model, names).items():
            d, per_group = m.head_dim, m.num_key_value_groups
            groups = m.v_proj.out_features // d
            v = m.v_proj.weight.reshape(groups, d, -1).norm(dim=(1, 2))
            o = m.o_proj.weight.reshape(-1, groups, per_group * d).norm(dim=(0, 2))
            plan[n] = _keep((v * o).float(), kept_count(groups, amount, multiple_of // math.gcd(multiple_of, d)))
    if "attn" in parts:
        for n, m in _attentions(model, names).items():
            d = m.head_dim
            heads = m.c_v.out_features // d
            v = m.c_v.weight.reshape(heads, d, -1).norm(dim=(1, 2))
            o = m.c_proj.weight.reshape(-1, heads, d).norm(dim=(0, 2))
            per_width = multiple_of // math.gcd(multiple_of, d)  # heads per multiple of the width
            plan[n] = _keep((v * o).float(), kept_count(heads, amount, per_width))
    return plan


def _head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()


def _units(model: nn.Module, plan: dict[str, torch.Tensor]) -> Iterator[tuple[nn.Module, dict, str, torch.Tensor]]:
    """(module, input projection name -> its kept rows, output projection name, its kept columns)."""
    for n, kept in plan.items():
        m = model.get_submodule(n)
        if hasattr(m, "num_key_value_groups"):  # kept: key/value groups, each with its query heads
            per_group = m.num_key_value_groups
            queries = _head_rows((kept[:, None] * per_group + torch.arange(per_group, device=kept.device)).flatten(),
                                 m.head_dim)
            kv = _head_rows(kept, m.head_dim)
            yield m, {"q_proj": queries, "k_proj": kv, "v_proj": kv}, "o_proj", queries
        elif hasattr(m, "head_dim"):
            rows = _head_rows(kept, m.head_dim)
            yield m, {"c_q": rows, "c_k": rows, "c_v": rows}, "c_proj", rows
        elif hasattr(m, "gate_proj"):
            yield m, {"gate_proj": kept, "up_proj": kept}, "down_proj", kept
        else:
            yield m, {"c_fc": kept, "c_fc2": kept}, "c_proj", kept


@torch.no_grad()
def mask_structured(model: nn.Module, plan: dict[str, torch.Tensor]) -> None:
    """Zero the units the plan drops, leaving shapes as they are (the reference ``shrink`` must match)."""
    for m, inputs, output, cols in _units(model, plan):
        for name, rows in inputs.items():
            lin = getattr(m, name, None)
            if lin is None:
                continue
            drop = torch.ones(lin.out_features, dtype=torch.bool, device=rows.device)
            drop[rows] = False
            lin.weight[drop] = 0
            if lin.bias is not None:
                lin.bias[drop] = 0
        out = getattr(m, output)
        drop = torch.ones(out.in_features, dtype=torch.bool, device=cols.device)
        drop[cols] = False
        out.weight[:, drop] = 0


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(w.clone())
    if lin.bias is not None:
        new.bias = nn.Parameter((lin.bias.detach()[rows] if rows is not None else lin.bias.detach()).clone())
    return new


@torch.no_grad()
def shrink(model: nn.Module, plan: dict[str, torch.Tensor]) -> None:
    """Replace each planned module's projections with smaller dense ones holding only the kept units."""
    for m, inputs, output, cols in _units(model, plan):
        for name, rows in inputs.items():
            if getattr(m, name, None) is not None:
                setattr(m, name, _sliced(getattr(m, name), rows=rows))
        setattr(m, output, _sliced(getattr(m, output), cols=cols))
