"""Which MLP widths the CPU kernels like: the default of ``pruning.multiple_of`` is chosen from this.

Structured pruning keeps ``round((1 - amount) * hidden)`` neurons; the kernels (fp32 GEMM, PyTorch's
int8 dynamic Linear) may run an odd width slower than a nearby round one. For each model's MLP shape
and each amount, the kept width is rounded to each multiple and the MLP (c_fc → GELU → c_proj) is
timed at that width in fp32 and in int8 (PyTorch's dynamic Linear, the backend ``auto`` picks on
AVX2), interleaved, warm-up excluded, median of ``--repeats``. Printed: milliseconds per 1000 kept
neurons relative to the unrounded width (< 1: the rounded width runs each neuron faster), and the
geometric mean per multiple.

    python benchmarks/pruned_widths.py            # run it alone: nothing else on the machine
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from torch import nn

from costlab.measure.machine import cpu_info
from costlab.quantization.pytorch_int8 import quantize_linear

SHAPES = {"gpt_nano": (128, 512), "gpt_micro": (384, 1536)}  # (n_embd, MLP hidden)
AMOUNTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MULTIPLES = (1, 8, 16, 32, 64)


def round_to(n: int, multiple: int, total: int) -> int:
    if multiple <= 1 or total < multiple:
        return n
    return min(total, max(multiple, multiple * round(n / multiple)))


def mlp(d: int, h: int, int8: bool) -> nn.Module:
    m = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).eval()
    if int8:
        m = nn.Sequential(quantize_linear(m[0]), nn.GELU(), quantize_linear(m[2]))
    return m


@torch.inference_mode()
def time_ms(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    items = list(models.items())
    for i in range(3 + repeats):
        for k, m in items if i % 2 else items[::-1]:
            t0 = time.perf_counter()
            m(x)
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.backends.quantized.engine = "x86"
    cpu = cpu_info()
    print(f"CPU: {cpu.model} ({','.join(sorted(cpu.features)) or 'features unknown'}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.tokens} tokens per call")
    ratios: dict[tuple[str, int], list[float]] = {}
    for model, (d, hidden) in SHAPES.items():
        x = torch.randn(args.tokens, d)
        for amount in AMOUNTS:
            kept = max(1, hidden - round(amount * hidden))
            widths = {mult: round_to(kept, mult, hidden) for mult in MULTIPLES}
            for kind in ("fp32", "int8"):
                models = {w: mlp(d, w, kind == "int8") for w in set(widths.values())}
                ms = time_ms(models, x, args.repeats)
                base = ms[kept] / kept
                row = []
                for mult, w in widths.items():
                    r = (ms[w] / w) / base
                    ratios.setdefault((kind, mult), []).append(r)
                    row.append(f"x{mult}:{w}={r:.2f}")
                print(f"{model:9} amount={amount:.1f} {kind}  kept={kept:5d}  " + "  ".join(row), flush=True)
    print("\ngeometric mean of (ms per kept neuron) / (ms per neuron at the unrounded width); < 1 is faster")
    for kind in ("fp32", "int8"):
        means = {m: math.exp(statistics.mean(map(math.log, ratios[(kind, m)]))) for m in MULTIPLES}
        print(f"  {kind}: " + "  ".join(f"multiple_of={m}: {v:.3f}" for m, v in means.items()))


if __name__ == "__main__":
    main()
