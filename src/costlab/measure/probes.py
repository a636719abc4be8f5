"""Short measurements of this machine, taken where a decision depends on them: how fast a matmul runs
in each dtype, and whether a precision a run asks for is native here (a one-line warning before
launch when it is not). torch is imported only when a probe runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from costlab.measure.machine import Cpu

PROBE_SIZE = 256  # n of the n x n x n matmul: ~34 MFLOP, milliseconds in fp32, well under a second when emulated
PROBE_MIN_S = 0.05  # each dtype is timed for at least this long after one warm-up call


def matmul_gflops(dtype_name: str, n: int = PROBE_SIZE, min_s: float = PROBE_MIN_S) -> float:
    """GFLOP/s of an ``n``-cube matmul in ``dtype_name`` (``float32``, ``bfloat16``, ``float16``) on the
    CPU: one warm-up call, then the median of repeated calls lasting at least ``min_s`` in all."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: first-call dispatch and kernel selection
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9


def slow_precision_warning(cfg: DictConfig, cpu: Cpu) -> str | None:
    """The warning for a CPU run whose autocast dtype this CPU has no native matmuls for, with the
    slowdown a probe measured here; None when the precision is fp32, native, or the run is on a GPU."""
    dtype = cfg.precision.get("autocast_dtype")
    if cfg.trainer.device != "cpu" or not dtype:
        return None
    lacks = cpu.lacks_native(dtype)
    if not lacks:
        return None
    ref, slow = matmul_gflops("float32"), matmul_gflops(dtype)
    ratio = ref / slow
    speed = f"runs {ratio:.0f}x slower than" if ratio >= 2 else f"takes {ratio:.2f}x the time of"
    return (f"costlab: warning: precision={cfg.precision.name}: a {dtype} matmul here {speed} fp32 "
            f"({slow:.1f} vs {ref:.1f} GFLOP/s, {PROBE_SIZE}^3 probe): this CPU ({cpu.model}) has no "
            f"{'/'.join(lacks)}; the run goes on and measures it")


PEAK_SIZES = (256, 512, 1024, 2048)  # the probe grows the matmul until one call takes PEAK_CALL_S
PEAK_CALL_S = 0.02
PEAK_MIN_S = 0.3


def _peak_gflops(dtype_name: str) -> tuple[float, int]:
    """The best GFLOP/s of square matmuls in ``dtype_name`` on this process's threads: the size grows until
    one call lasts ``PEAK_CALL_S`` (large enough to leave the overheads behind), then the fastest of the
    calls within ``PEAK_MIN_S`` after a warm-up counts. Returns (GFLOP/s, n)."""
    import torch

    dtype = getattr(torch, dtype_name)
    for n in PEAK_SIZES:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if time.perf_counter() - t0 >= PEAK_CALL_S or n == PEAK_SIZES[-1]:
            break
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < PEAK_MIN_S:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9, n


def _machine_key(cpu: Cpu) -> str:
    """What a cached probe is kept per: the CPU model, its features and torch's version."""
    import torch

    return f"{cpu.model}|{','.join(sorted(cpu.features))}|torch={torch.__version__}"


def _read_table(cache: Path | None) -> dict[str, Any]:
    if cache is not None and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass
    return {}


def _write_table(cache: Path | None, table: dict[str, Any]) -> None:
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(cache)  # atomic: concurrent runs never read half a file
    except OSError:
        pass  # an unwritable cache only loses the history of probes


def cpu_peak_tflops(dtype: str, cache: Path | None, cpu: Cpu) -> tuple[float, str]:
    """The CPU's peak TFLOP/s in ``dtype`` (``fp32``, ``bf16``, ``fp16``) with this process's threads.

    Load from other processes can only make a probe slower, never faster, so every run probes again and
    the peak is the best probe seen on this machine (per CPU model, features, thread count and torch
    version), kept in ``cache`` (a JSON file; None: not kept). Returns (TFLOP/s, where it came from)."""
    import torch

    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    cpu_key, version = _machine_key(cpu).rsplit("|", 1)  # the threads before torch's version, as kept before
    key = f"{cpu_key}|threads={torch.get_num_threads()}|{version}|{dtype}"
    table = _read_table(cache)
    gflops, n = _peak_gflops(names[dtype])
    best = table.get(key, {"tflops": 0.0, "n": n, "probes": 0})
    best["probes"] = int(best.get("probes", 1)) + 1
    if gflops / 1000 > best["tflops"]:
        best.update(tflops=gflops / 1000, n=n)
    table[key] = best
    _write_table(cache, table)
    return float(best["tflops"]), f"cpu probe (best of {best['probes']}: {best['n']}^3 {dtype} matmul)"


LINK_HISTORY = 5  # the link probes of a machine's runs kept per rank count; a plan reads their median


def _link_key(cpu: Cpu, ranks: int) -> str:
    return f"{_machine_key(cpu)}|link|latency=in-step|ranks={ranks}"  # (earlier: back to back)


def remember_link(cache: Path | None, cpu: Cpu, ranks: int, link: dict[str, tuple[float, float]]) -> None:
    """Keep a run's link probe (per collective: latency s, bytes/s between ``ranks`` ranks on this one machine) in
    ``cache`` beside the CPU's peak, the last :data:`LINK_HISTORY` of them per rank count: what a plan of that many
    ranks here prices its collectives with (:func:`cached_link`); a plan has no peers to probe them with."""
    table = _read_table(cache)
    key = _link_key(cpu, ranks)
    entry = table.get(key) if isinstance(table.get(key), dict) else {}
    history = [*entry.get("probes", []), {k: [float(lat), float(bw)] for k, (lat, bw) in link.items()}]
    table[key] = {"probes": history[-LINK_HISTORY:]}
    _write_table(cache, table)


def cached_link(cache: Path | None, cpu: Cpu, ranks: int) -> tuple[dict[str, tuple[float, float]], int] | None:
    """The median per collective of the link probes that runs of ``ranks`` ranks on this machine kept
    (:func:`remember_link`), and how many; None where none did."""
    import statistics

    probes = _read_table(cache).get(_link_key(cpu, ranks), {}).get("probes") or []
    kinds = set.intersection(*(set(p) for p in probes)) if probes else set()
    if not kinds:
        return None
    return {k: (statistics.median(p[k][0] for p in probes), statistics.median(p[k][1] for p in probes))
            for k in sorted(kinds)}, len(probes)


NF4_PROBE_SHAPE = (1024, 1024, 256)  # out, in features and rows of the Linear each NF4 backend is timed on


NF4_PROBE_MIN_S = 0.15


def nf4_linear_ms(backend: str, min_s: float = NF4_PROBE_MIN_S) -> float:
    """Milliseconds of a forward and backward (to the input: the base is frozen) through a Linear whose weight
    an NF4 ``backend`` holds (:data:`NF4_PROBE_SHAPE`): the fastest of the calls within ``min_s`` after two
    warm-up calls (load from other processes only slows a call down)."""
    import torch

    from costlab.models.adapters import _bnb_linear, _torchao_nf4

    out_f, in_f, rows = NF4_PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    if backend == "bitsandbytes":
        linear = _bnb_linear(linear, None)
    else:
        _torchao_nf4(linear)
    x = torch.randn(rows, in_f, generator=g, requires_grad=True)

    def call() -> None:
        x.grad = None
        linear(x).sum().backward()

    call()
    call()
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        call()
        best, calls = min(best, time.perf_counter() - t0), calls + 1
    return 1000 * best


def choose_nf4_backend(candidates: tuple[str, ...]) -> tuple[str, dict[str, float]]:
    """The NF4 backend among ``candidates`` (those installed and able to run the layout) whose Linear is the
    fastest here, and each one's time (:func:`nf4_linear_ms`); the only candidate without timing."""
    if len(candidates) == 1:
        return candidates[0], {}
    times = {b: nf4_linear_ms(b) for b in candidates}
    return min(times, key=times.__getitem__), times
