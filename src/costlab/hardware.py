"""What the machine has: the GPUs ``nvidia-smi`` names (no CUDA context is ever created here), and
the device a run resolves to."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from costlab.errors import ConfigError


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
