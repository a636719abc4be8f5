"""Measurements: step timing, memory, model size on disk and inference speed.

Every figure here is measured: devices are synchronised before a clock is read, and warm-up
iterations are left out of every speed figure.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from costlab.measure.names import MEM_GRADS, MEM_OPTIMIZER, MEM_PARAMS, PERF_TOKENS_PER_S


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """A clock reading taken after all queued work on ``device`` has finished."""
    sync(device)
    return time.perf_counter()


@dataclass
class StepStats:
    """Step times after warm-up, and the tokens those steps processed (all ranks together)."""

    warmup_steps: int
    tokens_per_step: int
    times_s: list[float] = field(default_factory=list)
    steps_seen: int = 0

    def add(self, seconds: float) -> None:
        self.steps_seen += 1
        if self.steps_seen > self.warmup_steps:
            self.times_s.append(seconds)

    def summary(self) -> dict[str, float]:
        if not self.times_s:  # too few steps to leave warm-up: say nothing rather than guess
            return {}
        total = sum(self.times_s)
        return {
            PERF_TOKENS_PER_S: self.tokens_per_step * len(self.times_s) / total,
            "perf/step_time_ms_p50": 1000 * statistics.median(self.times_s),
            "perf/step_time_ms_mean": 1000 * total / len(self.times_s),
            "perf/timed_steps": len(self.times_s),
        }


def peak_memory_bytes(device: torch.device, held: Peaks | None = None) -> int:
    """This process's peak: ``max_memory_allocated`` on GPU (at least ``held``'s, the peak before the allocator's
    were restarted); on CPU the peak resident set size, ``held``'s where it has one (the resident set's peak cannot
    be restarted: what came after it, the time model's probes, is left out)."""
    if device.type == "cuda":
        return max(torch.cuda.max_memory_allocated(device), held.allocated if held else 0)
    return held.rss if held and held.rss else _max_rss()


def _max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


@dataclass(frozen=True)
class Peaks:
    """The GPU allocator's peaks so far, or on CPU the resident set's (:func:`hold_peaks`)."""

    allocated: int = 0
    reserved: int = 0
    rss: int = 0


def hold_peaks(device: torch.device) -> Peaks:
    """The peaks so far, before work that is not the run's (the time model's probes, which build and train models
    of their own), to pass to :func:`restart_peaks` after it and to the peak readings at the end: the GPU
    allocator's, or on CPU the resident set's (which cannot be restarted: a CPU run's peak is the one held)."""
    if device.type != "cuda":
        return Peaks(rss=_max_rss())
    return Peaks(torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))


def restart_peaks(device: torch.device) -> None:
    """After the work :func:`hold_peaks` was taken before: its cached blocks go back to the card and the
    allocator's peaks restart from what is allocated now, so the run's peaks are the held ones and those of what
    follows."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_reserved_memory(device: torch.device, held: Peaks | None = None) -> dict[str, float]:
    """``mem/peak_reserved_bytes`` on GPU: ``max_memory_reserved`` (at least ``held``'s), largest over ranks, with
    the allocator's retry and out-of-memory counts (``torch.cuda.memory_stats``). The caching allocator
    holds freed blocks for reuse, so what a run takes from the card (and what other processes cannot have)
    is its reservation, not only what it allocated. CPU has no such figure: nothing is logged there.
    A collective on several ranks: every rank calls it."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    reserved = max(torch.cuda.max_memory_reserved(device), held.reserved if held else 0)
    return {
        "mem/peak_reserved_bytes": max_over_ranks(reserved, device),
        # the allocator freed its cache and retried (a sign of fragmentation near the limit), or gave up
        "mem/alloc_retries": max_over_ranks(stats.get("num_alloc_retries", 0), device),
        "mem/ooms": max_over_ranks(stats.get("num_ooms", 0), device),
    }


def sum_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def max_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of this rank's part of ``t``: a DTensor's local shard; a tensor subclass (torchao's low-bit
    optimizer states, quantized weights) by the plain tensors it holds (codes, scales, tables)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves(local))


def state_bytes_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards only)."""
    params = list(model.parameters())
    out = {
        MEM_PARAMS: sum(local_bytes(p) for p in params),
        MEM_GRADS: sum(local_bytes(p.grad) for p in params if p.grad is not None),
    }
    if optimizer is not None:
        out[MEM_OPTIMIZER] = sum(
            local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        )
    return out


def save_model(model: nn.Module, path: Path) -> int:
    """Save the state dict as it would be shipped; return the bytes on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return os.path.getsize(path)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as it is, tied weights counted once and
    quantized weights (torchao tensor subclasses, PyTorch's packed int8 Linears) counted by the dense
    values they stand for."""
    total = nonzero = 0
    for p in [*model.parameters(), *packed_tensors(model)]:
        total += p.numel()
        nonzero += int(torch.count_nonzero(_dense(p)).item())
    return total, nonzero


def packed_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The weights and biases PyTorch's dynamic int8 Linears hold outside ``parameters()`` (weights
    dequantized): counted like any parameter."""
    with warnings.catch_warnings():  # the eager-workflow deprecation notice: these modules are the kernels
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear
    out = []
    for m in model.modules():
        if isinstance(m, Linear):
            out.append(m.weight().dequantize())
            if m.bias() is not None:
                out.append(m.bias().detach())
    return out


def _dense(t: torch.Tensor) -> torch.Tensor:
    """The dense values a weight stands for. A tensor subclass that dequantizes (torchao's int8 and float8
    tensors) or densifies (2:4 sparse) itself does so; one that only computes a linear layer (torchao's int4
    tile-packed weights and its older dynamic-activation wrapper, which dispatch no ``aten.dequantize``)
    gives its values as the identity through it."""
    cls = type(t)
    if cls in (torch.Tensor, nn.Parameter):
        return t.detach()
    if cls.dequantize is not torch.Tensor.dequantize:
        return t.dequantize()
    if cls.to_dense is not torch.Tensor.to_dense:
        return t.to_dense()
    if t.dim() == 2:
        with torch.no_grad():
            return nn.functional.linear(torch.eye(t.shape[1], dtype=t.dtype, device=t.device), t).T
    return t.dequantize()


def leaves(t: object) -> list[torch.Tensor]:
    """The plain tensors a state-dict entry is stored as (a torchao tensor: its data and scales; a packed
    int8 Linear's (weight, bias): its int8 values, scales and bias; a bitsandbytes 4-bit weight: its packed codes
    and quantization state; not a tensor: none)."""
    if isinstance(t, (tuple, list)):
        return [leaf for x in t for leaf in leaves(x)]
    if not isinstance(t, torch.Tensor):
        return []
    if t.is_quantized:
        scales = t.q_per_channel_scales() if t.qscheme() == torch.per_channel_affine else torch.tensor([t.q_scale()])
        return [t.int_repr(), scales]
    quant = getattr(t, "quant_state", None)  # bitsandbytes' Params4bit: packed codes, the rest beside them
    if quant is not None:
        nested = getattr(quant, "state2", None)
        parts = (quant.absmax, quant.code, quant.offset, *((nested.absmax, nested.code) if nested else ()))
        return [t.detach(), *(x for x in parts if isinstance(x, torch.Tensor))]
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t.detach()]
    names, _ = t.__tensor_flatten__()
    return [leaf for n in names if (x := getattr(t, n)) is not None for leaf in leaves(x)]


def _nonzero(t: torch.Tensor) -> int:
    try:
        return int(torch.count_nonzero(t))
    except (RuntimeError, NotImplementedError):  # float8 and other byte types without the kernel
        return int(torch.count_nonzero(t.view(torch.uint8)))


def sparse_savings(state: dict[str, Any]) -> int:
    """Bytes a sparse encoding would save over the dense file: each stored tensor kept as its non-zero
    values plus a 1-bit-per-element presence mask, where that is smaller (for 2:4, this equals the
    values plus 2-bit indices). Tied tensors are counted once, as ``torch.save`` stores them."""
    seen, saved = set(), 0
    for t in state.values():
        for leaf in leaves(t):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset(), leaf.numel())
            if key in seen or leaf.numel() == 0:
                continue
            seen.add(key)
            dense = leaf.numel() * leaf.element_size()
            sparse = _nonzero(leaf) * leaf.element_size() + math.ceil(leaf.numel() / 8)
            saved += max(0, dense - sparse)
    return saved


@torch.inference_mode()
def time_inference(
    models: dict[str, nn.Module],
    batch: torch.Tensor,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    warmup: int = 3,
    iters: int = 10,
) -> dict[str, float]:
    """Median seconds per forward pass of each model on one fixed batch, warm-up excluded.

    With several models the passes are interleaved, in an order that alternates every iteration, so
    load from elsewhere on the machine falls on all of them alike and their ratio is fair.
    """
    for m in models.values():
        m.eval()
    device = batch.device
    times: dict[str, list[float]] = {name: [] for name in models}
    items = list(models.items())
    for i in range(warmup + iters):
        for name, m in items if i % 2 else items[::-1]:
            t0 = now(device)
            with autocast():
                m(batch)
            t1 = now(device)
            if i >= warmup:
                times[name].append(t1 - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
