"""Refuse a config before any worker starts, with one line naming the key, the value and why.

Runs in the launcher, so it must stay light: no torch import, no CUDA initialisation. GPU facts
come from ``nvidia-smi``.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, why: str):
        super().__init__(f"{key}={value}: {why}")
        self.key, self.value, self.why = key, value, why


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


def require_gpu(key: str, value: Any, cfg: DictConfig, capability: tuple[int, int], what: str) -> None:
    """Refuse ``key=value`` unless the run is on CUDA GPUs of at least ``capability``."""
    gpus = visible_gpus()
    need = f"needs a CUDA GPU with compute capability >= {capability[0]}.{capability[1]} ({what})"
    if cfg.trainer.device != "cuda" or not gpus:
        raise ConfigError(key, value, f"{need}; this run is on {cfg.trainer.device}")
    weakest = min(gpus, key=lambda g: g.capability)
    if weakest.capability < capability:
        raise ConfigError(key, value, f"{need}; {weakest.name} is {weakest.capability[0]}.{weakest.capability[1]}")


def positive_int(cfg: DictConfig, key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "must be a positive integer")
    return value


def non_negative_int(cfg: DictConfig, key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "must be a non-negative integer")
    return value


def positive_float(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(key, value, "must be a positive number")
    return float(value)


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    """Every check that needs only the config and the machine, in the order a user reads the config."""
    t = cfg.trainer
    for key in ("max_steps", "batch_size", "grad_accum_steps", "nproc_per_node", "nnodes", "eval_batches",
                "eval_batch_size", "infer_batch_size", "infer_iters"):
        positive_int(cfg, f"trainer.{key}")
    for key in ("seed", "warmup_steps", "eval_interval", "timing_warmup_steps"):
        non_negative_int(cfg, f"trainer.{key}")
    positive_float(cfg, "trainer.lr")
    if t.grad_clip is not None and not (isinstance(t.grad_clip, (int, float)) and t.grad_clip > 0):
        raise ConfigError("trainer.grad_clip", t.grad_clip, "must be a positive number or null")
    if t.nnodes > 1 and not t.rdzv_endpoint:
        raise ConfigError("trainer.nnodes", t.nnodes, "several nodes need trainer.rdzv_endpoint=HOST:PORT")

    world = t.nnodes * t.nproc_per_node
    dp = data_parallel_size(cfg, world)
    micro = dp * t.grad_accum_steps
    if t.batch_size % micro:
        raise ConfigError(
            "trainer.batch_size", t.batch_size,
            f"must be divisible by data-parallel ranks x grad_accum_steps = {dp} x {t.grad_accum_steps}",
        )
    _check_model(cfg)
    _check_data(cfg)
    _check_parallelism(cfg, world)
    _check_precision(cfg)
    _check_compression(cfg)


def data_parallel_size(cfg: DictConfig, world: int) -> int:
    p = cfg.parallelism
    return world // int(p.get("tp_degree", 1) or 1) // int(p.get("pp_degree", 1) or 1)


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    for key in [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "context", "hidden") if k in m]:
        positive_int(cfg, f"model.{key}")
    if "n_head" in m and m.n_embd % m.n_head:
        raise ConfigError("model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
    if m.get("pos") == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError("model.pos", m.pos, f"rotary positions need an even head size, got {m.n_embd // m.n_head}")
    for key, allowed in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope")), ("mlp", ("gelu", "swiglu"))):
        if key in m and m[key] not in allowed:
            raise ConfigError(f"model.{key}", m[key], f"choose one of {', '.join(allowed)}")
    if m.vocab_size < 256:
        raise ConfigError("model.vocab_size", m.vocab_size, "byte-level data needs at least 256")


def _check_data(cfg: DictConfig) -> None:
    from costlab.data import is_text

    d = cfg.data
    if d.name == "textfile":
        path = Path(str(d.path)).expanduser()
        if not path.exists():
            raise ConfigError("data.path", d.path, "no such file or folder")
        if path.is_file():
            if path.stat().st_size == 0:
                raise ConfigError("data.path", d.path, "the file is empty")
            if not is_text(path):
                raise ConfigError("data.path", d.path, "not a UTF-8 text file")
        else:
            files = [p for p in path.rglob("*") if p.is_file()]
            if not files:
                raise ConfigError("data.path", d.path, "the folder holds no files")
            if not any(is_text(f) for f in files):
                raise ConfigError("data.path", d.path, "the folder holds no UTF-8 text files")
    if d.name == "synthetic":
        positive_int(cfg, "data.n_bytes")
        if not 2 <= d.alphabet <= 256:
            raise ConfigError("data.alphabet", d.alphabet, "must be between 2 and 256")


def _check_parallelism(cfg: DictConfig, world: int) -> None:
    p = cfg.parallelism
    n = cfg.trainer.nproc_per_node
    if p.name == "single" and world != 1:
        raise ConfigError("trainer.nproc_per_node", n, "parallelism=single runs one process; use parallelism=ddp")
    if cfg.trainer.device == "cuda":
        gpus = len(visible_gpus())
        if n > gpus:
            raise ConfigError("trainer.nproc_per_node", n, f"only {gpus} GPU(s) visible; one process per GPU")


def _check_precision(cfg: DictConfig) -> None:
    pass


def _check_compression(cfg: DictConfig) -> None:
    pass


def check_tracking(cfg: DictConfig) -> None:
    """The tracking store must exist or be creatable; otherwise refuse before anything starts."""
    from costlab.tracking import experiment_id, prepare_store

    uri = str(cfg.tracking.uri)
    try:
        prepare_store(uri)
        experiment_id(uri, cfg.tracking.experiment_name)
    except Exception as e:  # any failure to reach or create the store is the user's tracking.uri
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("tracking.uri", uri, f"cannot open or create the tracking store ({why})") from None
