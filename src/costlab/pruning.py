"""The ``pruning`` group: one mask (or shrink) per option, optional recovery, then the permanent result.

Mask options go through ``torch.nn.utils.prune``'s reparametrisation (``weight = weight_orig * mask``)
so that recovery fine-tuning holds the zeros, and ``prune.remove`` makes them permanent at the end.
A masked dense tensor still costs its full bytes and time: only ``structured`` (a smaller dense model)
and ``semi_structured`` on CUDA (2:4 sparse kernels) can make inference cheaper.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.nn.utils import prune

from costlab.checkpoint import match_targets
from costlab.data import BatchSampler, ByteCorpus
from costlab.parallelism import DistEnv, Parallel
from costlab.precision import autocast, autocast_dtype

GRADUAL_METHODS = ("l1_unstructured", "random_unstructured", "ln_structured")


def is_active(cfg: DictConfig) -> bool:
    return cfg.pruning.name != "none"


def target_layers(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers whose names match ``pruning.targets`` (glob patterns)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {n: linears[n] for n in match_targets(list(linears), targets)}


# --- masks ------------------------------------------------------------------------------------------


def _mask_classic(layers: dict[str, nn.Linear], p: DictConfig) -> None:
    """l1 / random / ln: exactly what ``torch.nn.utils.prune`` makes, reparametrised in place."""
    if p.name == "ln_structured":
        for m in layers.values():
            prune.ln_structured(m, "weight", amount=float(p.amount), n=p.n, dim=p.dim)
        return
    method = prune.L1Unstructured if p.name == "l1_unstructured" else prune.RandomUnstructured
    if p.scope == "global":
        prune.global_unstructured([(m, "weight") for m in layers.values()], method, amount=float(p.amount))
    else:
        for m in layers.values():
            method.apply(m, "weight", amount=float(p.amount))


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs of each row (the 2:4 pattern)."""
    out, inp = weight.shape
    groups = weight.detach().abs().reshape(out, inp // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)


@torch.no_grad()
def wanda_masks(
    model: nn.Module, layers: dict[str, nn.Linear], amount: float, batches: list[torch.Tensor], cfg: DictConfig
) -> dict[str, torch.Tensor]:
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂ over the calibration tokens, drop the lowest
    ``amount`` of each output row. One calibration pass through the dense model (not layer by layer)."""
    sq = {n: torch.zeros(m.in_features, device=m.weight.device, dtype=torch.float64) for n, m in layers.items()}

    def hook(name: str) -> Callable:
        def accumulate(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[name] += x.pow(2).sum(0)
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            with autocast(cfg, x.device):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    masks = {}
    for n, m in layers.items():
        score = m.weight.detach().abs().double() * sq[n].sqrt()[None, :]
        k = int(m.in_features * amount)
        mask = torch.ones_like(m.weight, dtype=torch.bool)
        if k:
            mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
        masks[n] = mask
    return masks


def calibration_batches(corpus: ByteCorpus, cfg: DictConfig, device: torch.device) -> list[torch.Tensor]:
    t = cfg.trainer
    sampler = BatchSampler(corpus.train, cfg.model.block_size, t.eval_batch_size, t.seed + 2)
    return [sampler.batch(i)[0].to(device) for i in range(cfg.pruning.calibration_batches)]


# --- structured: physically remove MLP neurons and attention heads ---------------------------------------


def _mlps(model: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    """Modules with a ``c_fc`` → ``c_proj`` hidden layer (a GPT block's MLP, or the mlp model itself)."""
    out = {}
    for n, m in model.named_modules():
        pre = f"{n}." if n else ""
        if isinstance(getattr(m, "c_fc", None), nn.Linear) and isinstance(getattr(m, "c_proj", None), nn.Linear):
            if any(f"{pre}{c}" in names for c in ("c_fc", "c_fc2", "c_proj")):
                out[n] = m
    return out


def _attentions(model: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(getattr(m, "c_q", None), nn.Linear) and hasattr(m, "head_dim"):
            if any(f"{n}.{c}" in names for c in ("c_q", "c_k", "c_v", "c_proj")):
                out[n] = m
    return out


def _keep(scores: torch.Tensor, amount: float) -> torch.Tensor:
    n_keep = max(1, scores.numel() - round(amount * scores.numel()))
    return scores.topk(n_keep).indices.sort().values


@torch.no_grad()
def plan_structured(model: nn.Module, layers: dict[str, nn.Linear], amount: float, parts) -> dict[str, torch.Tensor]:
    """Module name -> indices to keep: hidden neurons of each MLP, heads of each attention.

    Importance is the magnitude of the unit's path through the layer: ‖row of c_fc‖·‖column of c_proj‖
    for a neuron (times ‖row of c_fc2‖ for SwiGLU), ‖V rows‖·‖output columns‖ for a head.
    """
    names, plan = set(layers), {}
    if "mlp" in parts:
        for n, m in _mlps(model, names).items():
            score = m.c_fc.weight.norm(dim=1) * m.c_proj.weight.norm(dim=0)
            if getattr(m, "c_fc2", None) is not None:
                score = score * m.c_fc2.weight.norm(dim=1)
            plan[n] = _keep(score.float(), amount)
    if "attn" in parts:
        for n, m in _attentions(model, names).items():
            d = m.head_dim
            heads = m.c_v.out_features // d
            v = m.c_v.weight.reshape(heads, d, -1).norm(dim=(1, 2))
            o = m.c_proj.weight.reshape(-1, heads, d).norm(dim=(0, 2))
            plan[n] = _keep((v * o).float(), amount)
    return plan


def _head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()


def _units(model: nn.Module, plan: dict[str, torch.Tensor]):
    """(module, kept rows of its input projections = kept columns of its c_proj, input projection names)."""
    for n, kept in plan.items():
        m = model.get_submodule(n)
        if hasattr(m, "head_dim"):
            rows = _head_rows(kept, m.head_dim)
            yield m, rows, ("c_q", "c_k", "c_v")
        else:
            yield m, kept, ("c_fc", "c_fc2")


@torch.no_grad()
def mask_structured(model: nn.Module, plan: dict[str, torch.Tensor]) -> None:
    """Zero the units the plan drops, leaving shapes as they are (the reference ``shrink`` must match)."""
    for m, rows, inputs in _units(model, plan):
        for name in inputs:
            lin = getattr(m, name, None)
            if lin is None:
                continue
            drop = torch.ones(lin.out_features, dtype=torch.bool, device=rows.device)
            drop[rows] = False
            lin.weight[drop] = 0
            if lin.bias is not None:
                lin.bias[drop] = 0
        drop = torch.ones(m.c_proj.in_features, dtype=torch.bool, device=rows.device)
        drop[rows] = False
        m.c_proj.weight[:, drop] = 0


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
    for m, rows, inputs in _units(model, plan):
        for name in inputs:
            if getattr(m, name, None) is not None:
                setattr(m, name, _sliced(getattr(m, name), rows=rows))
        m.c_proj = _sliced(m.c_proj, cols=rows)


# --- gradual pruning during training (Zhu & Gupta 2017) ---------------------------------------------------


def cubic_sparsity(step: int, amount: float, start: int, end: int) -> float:
    """s_t = s_f · (1 − (1 − (t − t0)/(t1 − t0))³), flat at 0 before t0 and at s_f after t1."""
    progress = min(1.0, max(0.0, (step - start) / max(1, end - start)))
    return amount * (1 - (1 - progress) ** 3)


def training_hook(model: nn.Module, cfg: DictConfig) -> Callable[[int], None] | None:
    """For ``schedule=gradual``: a hook the trainer calls before each step (and once after the last).

    Masks only grow (pruned weights score 0), and are multiplied in before every step because the
    optimizer revives pruned weights. Weights are replicated (single, ddp), so every rank computes
    the same masks from the same weights.
    """
    p = cfg.pruning
    if not is_active(cfg) or p.get("schedule", "oneshot") != "gradual":
        return None
    layers = target_layers(model, p.targets)
    start = int(p.start_step)
    end = int(p.end_step if p.end_step is not None else cfg.trainer.max_steps)
    g = torch.Generator().manual_seed(cfg.trainer.seed)
    # random_unstructured: fixed random scores, so the growing mask is a nested random subset
    rand = {n: torch.rand(m.weight.shape, generator=g).to(m.weight.device) for n, m in layers.items()}
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}

    @torch.no_grad()
    def update(amount: float) -> None:
        scores = {}
        for n, m in layers.items():
            base = rand[n] if p.name == "random_unstructured" else m.weight.detach().float()
            scores[n] = base * masks[n]
        if p.name == "ln_structured":
            for n in layers:
                masks[n] = prune.LnStructured(amount, n=p.n, dim=p.dim).compute_mask(
                    scores[n], torch.ones_like(scores[n])).bool()
        elif p.scope == "global":
            flat = torch.cat([s.flatten() for s in scores.values()])
            flat_mask = prune.L1Unstructured(amount).compute_mask(flat, torch.ones_like(flat)).bool()
            for n, part in zip(scores, flat_mask.split([s.numel() for s in scores.values()]), strict=True):
                masks[n] = part.view_as(scores[n])
        else:
            for n in layers:
                masks[n] = prune.L1Unstructured(amount).compute_mask(scores[n], torch.ones_like(scores[n])).bool()

    @torch.no_grad()
    def hook(step: int) -> None:
        if start <= step <= end and ((step - start) % p.frequency == 0 or step == end):
            update(cubic_sparsity(step, float(p.amount), start, end))
        for n, m in layers.items():
            m.weight.mul_(masks[n])

    return hook


# --- the whole step: mask or shrink, recover, make permanent ------------------------------------------


def recover(model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, device: torch.device) -> float:
    """Fine-tune on rank 0 alone with the trainer's loop; masks hold through the reparametrisation."""
    from costlab.train import build_optimizer, train

    p = cfg.pruning
    rcfg = copy.deepcopy(cfg)
    with open_dict(rcfg):
        t = rcfg.trainer
        t.lr = float(p.recovery_lr if p.get("recovery_lr") is not None else t.lr * t.min_lr_ratio)
        t.max_steps, t.warmup_steps, t.eval_interval, t.grad_accum_steps = int(p.recovery_steps), 0, 0, 1
        t.seed = t.seed + 1  # batches the main run did not start with
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=device)
    result = train(Parallel(model=model), build_optimizer(model, rcfg), corpus, rcfg, env)
    model.eval()
    return result.final_loss


def apply(model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, device: torch.device) -> dict[str, float]:
    """Prune ``model`` in place as ``cfg.pruning`` says; return what it did, measured."""
    p = cfg.pruning
    layers = target_layers(model, p.targets)
    before = sum(m.weight.numel() for m in layers.values())
    torch.manual_seed(cfg.trainer.seed)
    if p.name == "structured":
        shrink(model, plan_structured(model, layers, float(p.amount), p.parts))
        after = sum(m.weight.numel() for m in target_layers(model, p.targets).values())
        layers = {}
    elif p.get("schedule", "oneshot") == "gradual":  # the training hook left the zeros in place
        for m in layers.values():
            prune.custom_from_mask(m, "weight", m.weight.detach() != 0)
    elif p.name in ("l1_unstructured", "random_unstructured", "ln_structured"):
        _mask_classic(layers, p)
    elif p.name == "wanda":
        masks = wanda_masks(model, layers, float(p.amount), calibration_batches(corpus, cfg, device), cfg)
        for n, m in layers.items():
            prune.custom_from_mask(m, "weight", masks[n])
    elif p.name == "semi_structured":
        for m in layers.values():
            prune.custom_from_mask(m, "weight", two_four_mask(m.weight))
    else:
        raise ValueError(f"unknown pruning option {p.name}")
    out: dict[str, float] = {}
    if p.get("recovery_steps", 0):
        out["pruning/recovery_final_loss"] = recover(model, corpus, cfg, device)
    for m in layers.values():
        prune.remove(m, "weight")
    if layers:
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        out["pruning/target_sparsity"] = zeros / before
    else:
        out["pruning/target_sparsity"] = 1 - after / before  # removed, not zeroed
    return out


def uses_sparse_kernels(cfg: DictConfig) -> bool:
    return cfg.pruning.name == "semi_structured" and not cfg.pruning.get("allow_mask_only", False)


@torch.no_grad()
def accelerate(model: nn.Module, cfg: DictConfig) -> int:
    """semi_structured on CUDA: turn the 2:4 weights into sparse tensors the cuSPARSELt/CUTLASS kernels
    run. They take fp16/bf16 only, so these layers move to the run's autocast dtype. Returns the count."""
    if not uses_sparse_kernels(cfg):
        return 0
    from torch.sparse import to_sparse_semi_structured

    dtype = autocast_dtype(cfg)
    layers = target_layers(model, cfg.pruning.targets)
    for m in layers.values():
        m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach().to(dtype).contiguous()), False)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
    return len(layers)
