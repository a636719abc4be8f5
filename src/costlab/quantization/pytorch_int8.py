"""PyTorch's own dynamic int8 Linear (``torch.ao.nn.quantized.dynamic.Linear``): int8 per-channel weights
prepacked for the quantized engine's CPU kernels (``x86``, ``fbgemm``, ``onednn``), activations
quantized per batch on the fly. On CPUs without AVX-512 VNNI these kernels are the fast int8 path
where torchao's falls back to slow generic code; which backend wins is measured, not assumed
(:func:`probe_ms`).

The modules save as a state dict of quantized tensors (``weights_only``-loadable) and are rebuilt by
:func:`rebuild` when a saved model is loaded.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

ENGINES = ("x86", "fbgemm", "onednn")
PACKED = "._packed_params._packed_params"  # the state-dict key suffix of a packed Linear's (weight, bias)


def supported_engines() -> list[str]:
    return [e for e in ENGINES if e in torch.backends.quantized.supported_engines]


def dynamic_linear() -> type[nn.Module]:
    with warnings.catch_warnings():  # the eager-workflow deprecation notice: these modules are the kernels
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear
    return Linear


@torch.no_grad()
def quantize_linear(lin: nn.Linear) -> nn.Module:
    """``lin`` as a dynamic int8 Linear: symmetric per-output-channel int8 weights, float bias."""
    w = lin.weight.detach().float().cpu()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    with warnings.catch_warnings():  # qint8 tensors are deprecated as a public API; they are these kernels' input
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    q = dynamic_linear()(lin.in_features, lin.out_features, bias_=lin.bias is not None, dtype=torch.qint8)
    bias = lin.bias.detach().float().cpu() if lin.bias is not None else None
    q.set_weight_bias(qw, bias)
    return q


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def convert(model: nn.Module, layers: dict[str, nn.Linear], engine: str) -> int:
    """Replace ``layers`` (name -> Linear of ``model``) with dynamic int8 Linears packed for ``engine``;
    return how many were replaced. The engine is process-wide in PyTorch: it is set here."""
    torch.backends.quantized.engine = engine
    for name, lin in layers.items():
        _replace(model, name, quantize_linear(lin))
    return len(layers)


def rebuild(model: nn.Module, state: dict, engine: str | None = None) -> None:
    """Before ``load_state_dict``: turn the Linear layers that ``state`` holds packed into dynamic int8
    Linears of the saved shapes (packed for ``engine``, default the process's current one); a no-op for
    a state dict without them."""
    packed = [k for k in state if k.endswith(PACKED)]
    if packed and engine:
        torch.backends.quantized.engine = engine
    for key in packed:
        value = state[key]
        name = key[: -len(PACKED)]
        weight, bias = value
        q = dynamic_linear()(weight.shape[1], weight.shape[0], bias_=bias is not None, dtype=torch.qint8)
        _replace(model, name, q)


def _median_ms(fn: Callable[[], object], budget_s: float, reps: int) -> float:
    fn()  # warm-up: packing caches, first-call dispatch
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def probe_ms(layers: dict[str, nn.Linear], tokens: int, candidates: dict[str, Callable[[nn.Linear], nn.Module]],
             budget_s: float = 0.5, reps: int = 5) -> dict[str, float]:
    """Milliseconds one forward through all of ``layers`` takes with each candidate's version of them, on
    ``tokens`` rows: each distinct (out, in) shape is timed once (a copy of its first layer, warm-up
    excluded, median of up to ``reps`` calls within ``budget_s``) and weighted by how often it occurs."""
    shapes: Counter[tuple[int, int]] = Counter()
    first: dict[tuple[int, int], nn.Linear] = {}
    for lin in layers.values():
        shape = (lin.out_features, lin.in_features)
        shapes[shape] += 1
        first.setdefault(shape, lin)
    g = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for cand, make in candidates.items():
        total = 0.0
        for shape, count in shapes.items():
            layer = make(copy.deepcopy(first[shape]).float().cpu().eval())
            x = torch.randn(tokens, shape[1], generator=g)
            total += count * _median_ms(lambda: layer(x), budget_s, reps)  # noqa: B023 (called at once)
        out[cand] = total
    return out
