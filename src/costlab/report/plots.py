"""The report's figures (matplotlib, Agg backend: no display needed). Each function returns a figure, or
None when no run has the numbers it draws."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class RunRecord(Protocol):
    """What a figure needs of a run (``costlab.report.RunRecord``)."""

    label: str

    @property
    def finished(self) -> bool: ...

    def get(self, key: str) -> float | None: ...

MIB = 2**20


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def pareto(rows: Sequence[RunRecord], x_metric: str, xlabel: str, bigger_is_better: bool, y_metric: str,
           front_of: Callable[[list[tuple[float, float]], bool], list[int]]) -> Figure | None:
    """Quality against one cost, every finished run a labelled point, the Pareto front drawn and ringed."""
    runs = [r for r in rows if r.finished and r.get(x_metric) is not None and r.get(y_metric) is not None]
    if not runs:
        return None
    scale = MIB if x_metric.endswith("bytes") else 1.0
    points = [(r.get(x_metric) / scale, r.get(y_metric)) for r in runs]
    front = front_of(points, bigger_is_better)
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=2)
    fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", lw=1.5, zorder=1, label="Pareto front")
    ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="tab:red", zorder=3)
    labels: dict[tuple[float, float], list[str]] = {}  # runs at the same point share one label
    for r, point in zip(runs, points, strict=True):
        labels.setdefault(point, []).append(r.label)
    for (x, y), names in labels.items():
        ax.annotate(" / ".join(names), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{y_metric} (lower is better)")
    ax.set_title(f"quality vs {xlabel.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def loss_curves(histories: dict[str, tuple[list[int], list[float]]], metric: str) -> Figure | None:
    """Every run's training loss against the step, overlaid."""
    curves = {label: h for label, h in histories.items() if h[0]}
    if not curves:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def memory_bars(rows: Sequence[RunRecord], parts: tuple[str, str, str], peak: str) -> Figure | None:
    """Per-rank memory of each run, stacked: parameters, gradients, optimizer state, and the rest of the
    peak (activations, buffers, and on CPU the runtime itself, since the CPU peak is the process RSS)."""
    runs = [r for r in rows if r.finished and any(r.get(k) is not None for k in (*parts, peak))]
    if not runs:
        return None
    fig = _figure(max(5.0, 1.2 * len(runs) + 2), 4.5)
    ax = fig.add_subplot()
    names = ("parameters", "gradients", "optimizer state")
    bottom = [0.0] * len(runs)
    x = list(range(len(runs)))
    for name, key in zip(names, parts, strict=True):
        h = [(r.get(key) or 0.0) / MIB for r in runs]
        ax.bar(x, h, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, h, strict=True)]
    rest = [max(0.0, (r.get(peak) or 0.0) / MIB - b) for r, b in zip(runs, bottom, strict=True)]
    ax.bar(x, rest, bottom=bottom, label="rest of the peak", color="lightgray")
    ax.set_xticks(x, [r.label for r in runs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MiB per rank (largest rank)")
    ax.set_title("per-rank memory")
    ax.legend(fontsize=8)
    return fig


def serving_ladder(table: dict[str, list], tpot_ms_p99: float) -> Figure | None:
    """Output tokens/s against p99 time per output token, one line per model through its concurrencies
    (each point labelled with its concurrency), the latency target drawn."""
    if not table.get("concurrency"):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for model in dict.fromkeys(table["model"]):
        rows = [i for i, m in enumerate(table["model"]) if m == model]
        x = [table["tpot_ms_p99"][i] for i in rows]
        y = [table["output_tokens_per_s"][i] for i in rows]
        ax.plot(x, y, marker="o", label=f"{model} model")
        for i, xi, yi in zip(rows, x, y, strict=True):
            ax.annotate(f"c={table['concurrency'][i]}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(tpot_ms_p99, color="tab:red", ls="--", lw=1, label=f"target: p99 TPOT <= {tpot_ms_p99:g} ms")
    ax.set_xlabel("p99 time per output token (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("serving: throughput against latency, by concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
