"""Energy, where the hardware exposes a counter: NVIDIA's NVML total-energy counter of each rank's GPU
(``nvidia-ml-py``), or the CPU packages' RAPL counters (``/sys/class/powercap``). Nothing is estimated:
without a readable counter no energy metric is logged, and the tag ``costlab.energy_missing`` says why.

Training energy is read over the same steps as the throughput (from the first step after warm-up to the
end of the last; evaluations that fall in between are included) and divided by the tokens those steps
trained: ``energy/joules_per_token_train``. GPU counters are summed over ranks; a RAPL counter covers
the whole node, so it is only used on a single node.

Inference energy is read on rank 0 over back-to-back forward passes of the final model on the inference
batch, repeated for at least a second (counters tick every few to hundred milliseconds), warm-up
excluded: ``energy/joules_per_token_infer``. On CPU the RAPL figure is the node's, with the other ranks
idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

ENERGY_TRAIN = "energy/joules_per_token_train"
ENERGY_INFER = "energy/joules_per_token_infer"
INFER_ENERGY_MIN_S = 1.0
ENERGY_JOULES = "energy/train_joules"
ENERGY_SOURCE_TAG = "costlab.energy_source"
NO_ENERGY_TAG = "costlab.energy_missing"
POWERCAP = Path("/sys/class/powercap")


def rapl_packages(root: Path = POWERCAP) -> list[Path]:
    """The package-level RAPL domains (``intel-rapl:N``, also used by AMD) whose counter is readable."""
    found = []
    for d in sorted(root.glob("intel-rapl:*")):
        if ":" in d.name.split("intel-rapl:", 1)[1]:
            continue  # a sub-domain (core, uncore, dram): inside its package's figure
        try:
            int((d / "energy_uj").read_text())
        except (OSError, ValueError):
            continue
        found.append(d)
    return found


class RaplCounter:
    """The sum of the package counters, in joules, unwrapped across ``max_energy_range_uj``."""

    def __init__(self, packages: list[Path]):
        self.packages = packages
        self.ranges = [int((p / "max_energy_range_uj").read_text()) for p in packages]
        self.last = [self._raw(p) for p in packages]
        self.total_uj = 0

    @staticmethod
    def _raw(p: Path) -> int:
        return int((p / "energy_uj").read_text())

    def read(self) -> float:
        for i, p in enumerate(self.packages):
            now = self._raw(p)
            delta = now - self.last[i]
            self.total_uj += delta if delta >= 0 else delta + self.ranges[i]  # the counter wrapped
            self.last[i] = now
        return self.total_uj / 1e6


def energy_counter(device_type: str, device_index: int, nnodes: int,
                   root: Path = POWERCAP) -> tuple[Callable[[], float] | None, str]:
    """A function returning cumulative joules, and its source; or None and why there is none."""
    if device_type == "cuda":
        try:
            import pynvml
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # mJ since the driver loaded; Volta and newer
        except pynvml.NVMLError as e:
            return None, f"NVML has no energy counter here ({e})"
        return (lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000), "nvml total energy"
    if nnodes > 1:
        return None, "a RAPL counter covers one node; not used for a multi-node run"
    packages = rapl_packages(root)
    if not packages:
        return None, f"no readable RAPL package counter under {root}"
    counter = RaplCounter(packages)
    return counter.read, f"rapl ({', '.join(p.name for p in packages)})"


class TrainingEnergy:
    """A training step hook reading ``counter`` before the first timed step and after the last."""

    def __init__(self, counter: Callable[[], float] | None, warmup_steps: int, max_steps: int):
        self.counter, self.warmup, self.max_steps = counter, warmup_steps, max_steps
        self.start: float | None = None
        self.joules = 0.0  # this rank's share: 0 where it reads no counter

    def __call__(self, step: int) -> None:
        if self.counter is None or self.warmup >= self.max_steps:
            return
        if step == self.warmup:
            self.start = self.counter()
        elif step == self.max_steps and self.start is not None:
            self.joules = self.counter() - self.start


def inference_energy(model: Any, batch: Any, counter: Callable[[], float],
                     autocast: Callable[[], AbstractContextManager] = nullcontext,
                     min_s: float = INFER_ENERGY_MIN_S) -> float:
    """Joules per token of ``model``'s forward passes on ``batch``: the counter read before and after
    passes repeated for at least ``min_s`` (one warm-up pass first; the device synchronised at both ends)."""
    import torch

    def sync() -> None:
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)

    with torch.no_grad():
        with autocast():
            model(batch)
        sync()
        start, t0, passes = counter(), time.perf_counter(), 0
        while passes == 0 or time.perf_counter() - t0 < min_s:
            with autocast():
                model(batch)
            passes += 1
            if passes % 8 == 0 or time.perf_counter() - t0 >= min_s:
                sync()
        sync()
        joules = counter() - start
    return joules / (passes * batch.numel())


def rank_energy_counter(device_type: str, local_rank: int, is_main: bool,
                        nnodes: int) -> tuple[Callable[[], float] | None, str]:
    """The counter one rank reads: each GPU its own; on CPU one RAPL reading for the node, by rank 0 (the
    other ranks read none, and have nothing to say about it)."""
    if device_type == "cuda" or is_main:
        return energy_counter(device_type, local_rank, nnodes)
    return None, ""


def training_energy_metrics(joules: float, timed_tokens: int, counter: Callable[[], float] | None,
                            source: str) -> tuple[dict[str, float], dict[str, str]]:
    """``energy/train_joules`` and ``energy/joules_per_token_train`` from all ranks' joules over the timed
    steps, with the tag naming the counter; or no metric, and the tag saying why."""
    if counter is not None and joules > 0 and timed_tokens:
        return {ENERGY_JOULES: joules, ENERGY_TRAIN: joules / timed_tokens}, {ENERGY_SOURCE_TAG: source}
    why = source if counter is None else "no timed training steps to read it over"
    return {}, {NO_ENERGY_TAG: why}
