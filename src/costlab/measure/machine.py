"""What the machine has: the CPU's model and the instruction-set features that decide which levers
pay (read from ``/proc/cpuinfo``), the GPUs ``nvidia-smi`` names (no CUDA context is ever created
here), and the device a run resolves to."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from costlab.schema import ConfigError

# feature -> the /proc/cpuinfo flags that show it (any of them)
CPU_FEATURES: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_fp16": ("avx512_fp16",),
    "amx": ("amx_tile",),
    "amx_bf16": ("amx_bf16",),
    "amx_fp16": ("amx_fp16",),
}
# autocast dtype -> the features that give the CPU native matmuls in it
NATIVE_CPU_DTYPE: dict[str, tuple[str, ...]] = {
    "bfloat16": ("avx512_bf16", "amx_bf16"),
    "float16": ("avx512_fp16", "amx_fp16"),
}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Cpu:
    """The CPU's model name and which of :data:`CPU_FEATURES` it has."""

    model: str
    features: frozenset[str]
    known: bool  # False where the features could not be read (not Linux): nothing is assumed either way

    def lacks_native(self, dtype: str) -> tuple[str, ...]:
        """The features that would make ``dtype`` matmuls native, when the CPU has none of them; else ()."""
        need = NATIVE_CPU_DTYPE.get(dtype, ())
        if not need or not self.known or self.features & set(need):
            return ()
        return need

    def tags(self) -> dict[str, str]:
        return {"costlab.cpu.model": self.model,
                "costlab.cpu.features": ",".join(sorted(self.features)) if self.known else "unknown"}


def parse_cpuinfo(text: str) -> Cpu:
    """The first processor's model name and features in ``/proc/cpuinfo`` text."""
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
        if model and flags is not None:
            break
    if flags is None:
        return Cpu(model or platform.processor() or "unknown", frozenset(), known=False)
    found = frozenset(f for f, names in CPU_FEATURES.items() if flags & set(names))
    return Cpu(model or platform.processor() or "unknown", found, known=True)


@lru_cache(maxsize=4)
def cpu_info(path: Path = CPUINFO) -> Cpu:
    """This machine's CPU (``path`` is read when it exists; elsewhere the model is the platform's and the
    features are unknown)."""
    try:
        return parse_cpuinfo(path.read_text(errors="replace"))
    except OSError:
        return Cpu(platform.processor() or platform.machine() or "unknown", frozenset(), known=False)


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]


@lru_cache(maxsize=1)
def visible_gpus() -> tuple[Gpu, ...]:
    """The GPUs ``nvidia-smi`` reports (no CUDA context is created); empty without a driver."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        name, _, cap = line.rpartition(",")
        major, _, minor = cap.strip().partition(".")
        gpus.append(Gpu(name.strip(), (int(major), int(minor or 0))))
    return tuple(gpus)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if visible_gpus() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError("trainer.device", device, "choose auto, cpu or cuda")
    if device == "cuda" and not visible_gpus():
        raise ConfigError("trainer.device", device, "no CUDA GPU is visible on this machine; use trainer.device=cpu")
    return device


def require_gpu(key: str, value: Any, cfg: Any, capability: tuple[int, int], what: str) -> None:
    """Refuse ``key=value`` unless the run is on CUDA GPUs of at least ``capability``."""
    gpus = visible_gpus()
    need = f"needs a CUDA GPU with compute capability >= {capability[0]}.{capability[1]} ({what})"
    if cfg.trainer.device != "cuda" or not gpus:
        raise ConfigError(key, value, f"{need}; this run is on {cfg.trainer.device}")
    weakest = min(gpus, key=lambda g: g.capability)
    if weakest.capability < capability:
        raise ConfigError(key, value, f"{need}; {weakest.name} is {weakest.capability[0]}.{weakest.capability[1]}")
