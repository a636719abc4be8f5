"""Short measurements of this machine, taken where a decision depends on them: how fast a matmul runs
in each dtype, and whether a precision a run asks for is native here (a one-line warning before
launch when it is not). torch is imported only when a probe runs.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from costlab.hardware import Cpu

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
