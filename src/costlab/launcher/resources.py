"""What the machine can give a run, checked before launch: memory for the node's ranks, cores for its
processes; and, after a run, whether the kernel's OOM killer ended one of them.

Memory is the machine's available memory (``MemAvailable`` on Linux, through psutil), lowered by the cgroup v2
limit of this process's cgroup and its ancestors (``memory.max - memory.current``) where one is set and readable:
psutil has no cgroup API, so those files, and the OOM killer's counters, are read here.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
from omegaconf import DictConfig

from costlab.models.hf_config import is_hf, layer_count, read_config
from costlab.schema import ConfigError

GIB = 2**30
WARN_FRACTION = 0.8  # of the available memory: a prediction above it fits, but only just
RANKS_PER_CORE_REFUSED = 4  # more gloo ranks per core than this time-slices into uselessness
SELF_CGROUP = Path("/proc/self/cgroup")
MOUNTS = Path("/proc/self/mounts")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_dir(cgroup: Path = SELF_CGROUP, mounts: Path = MOUNTS) -> Path | None:
    """This process's cgroup v2 folder (the ``0::/path`` line of ``/proc/self/cgroup`` under the cgroup2
    mount, ``/sys/fs/cgroup`` or, on hybrid hosts, ``/sys/fs/cgroup/unified``), or None."""
    text, table = _read(cgroup), _read(mounts)
    if text is None or table is None:
        return None
    rel = next((line[3:].strip() for line in text.splitlines() if line.startswith("0::")), None)
    mount = next((f[1] for f in (line.split() for line in table.splitlines()) if len(f) > 2 and f[2] == "cgroup2"),
                 None)
    if rel is None or mount is None:
        return None
    return Path(mount) / rel.lstrip("/")


def _cgroup_headroom(folder: Path | None) -> int | None:
    """The tightest ``memory.max - memory.current`` of ``folder`` and its ancestors; None without a limit."""
    best = None
    while folder is not None:
        limit, used = _read(folder / "memory.max"), _read(folder / "memory.current")
        if limit is not None and used is not None and limit.strip() != "max":
            room = max(0, int(limit) - int(used))
            best = room if best is None else min(best, room)
        folder = folder.parent if folder != folder.parent else None
    return best


def cpu_memory_available() -> int | None:
    """Bytes this process could still allocate: the machine's available memory (``MemAvailable`` on Linux,
    as psutil reads it), or the cgroup's headroom when lower; None where neither is readable."""
    try:
        available: int | None = psutil.virtual_memory().available
    except (OSError, RuntimeError):  # no /proc/meminfo (or no psutil support) here
        available = None
    room = _cgroup_headroom(cgroup_dir())
    if room is not None and (available is None or room < available):
        return room
    return available


def _counter(text: str | None, key: str = "oom_kill") -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def _v1_memory_dir(cgroup: Path = SELF_CGROUP) -> Path | None:
    for line in (_read(cgroup) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


def oom_kill_count(folder: Path | None = None) -> int | None:
    """How many processes the kernel's OOM killer has ended: the ``oom_kill`` counter of ``memory.events``
    in this process's cgroup v2 (or ``folder``; hierarchical: kills in child cgroups count too), else of
    ``memory.oom_control`` in its cgroup v1, else the machine's (``/proc/vmstat``). None where none can
    be read."""
    if folder is not None:
        return _counter(_read(folder / "memory.events"))
    v2, v1 = cgroup_dir(), _v1_memory_dir()
    for text in (_read(v2 / "memory.events") if v2 else None, _read(v1 / "memory.oom_control") if v1 else None,
                 _read(Path("/proc/vmstat"))):
        count = _counter(text)
        if count is not None:
            return count
    return None


def describe_kill(before: int | None, after: int | None) -> str | None:
    """Why a run's worker vanished, when the OOM killer's counter rose between ``before`` and ``after``."""
    if before is None or after is None or after <= before:
        return None
    n = after - before
    return f"out of memory: the kernel's OOM killer ended a process of the run ({n} kill(s) during the run)"


def check_resources(cfg: DictConfig) -> list[str]:
    """Refuse (:class:`ConfigError`) a run the node cannot hold or schedule; return warning lines for one
    that only just fits. Runs in the launcher after ``validate`` (``trainer.device`` resolved)."""
    warnings = _check_cores(cfg)
    warnings += _check_memory(cfg)
    return warnings


def _check_cores(cfg: DictConfig) -> list[str]:
    n, cores = int(cfg.trainer.nproc_per_node), os.cpu_count()
    if cores is None or n <= cores:
        return []
    if n > RANKS_PER_CORE_REFUSED * cores:
        raise ConfigError("trainer.nproc_per_node", n, f"{n} processes on {cores} CPU core(s) would spend their "
                          f"time waiting for each other; use at most {cores} (refused above {RANKS_PER_CORE_REFUSED}"
                          " per core)")
    return [f"trainer.nproc_per_node={n} runs more processes than the {cores} CPU core(s): they will share them"]


SKIP_BELOW = 0.25  # of the available memory: a rough upper bound below this needs no exact prediction


def rough_upper_bound(cfg: DictConfig) -> float:
    """A generous upper bound of one rank's training bytes, from the config alone (no torch): every weight
    unsharded with its gradient and AdamW state (16 bytes), and at least twice the activations the memory
    model counts per token (fp32 everywhere, the whole batch on one rank). Only decides whether the exact
    prediction (:func:`costlab.measure.memory.predict_state`) is worth making."""
    m, t = cfg.model, cfg.trainer
    tokens = int(t.batch_size) * int(m.block_size)
    if is_hf(cfg):  # the Hugging Face config's own shape keys
        try:
            hf = read_config(m)
        except (OSError, ValueError):  # a hub id: nothing on disk to size it by
            return 0.0
        d, v = int(hf.get("hidden_size") or hf["n_embd"]), int(hf["vocab_size"])
        layers = layer_count(hf)
        heads = int(hf.get("num_attention_heads") or hf["n_head"])
        h = float(hf.get("intermediate_size") or hf.get("n_inner") or 4 * d)
        positions = int(hf.get("max_position_embeddings") or hf.get("n_positions") or 0)
        weights = layers * (4 * d * d + 3 * h * d + 16 * d) + 2 * v * d + positions * d
        return 16.0 * weights + tokens * 8 * (layers * (24 * d + 4 * h + heads) + 2 * v + 4 * d)
    d, v = int(m.n_embd), int(m.vocab_size)
    if "n_layer" not in m:
        weights = (int(m.context) * d + d) * int(m.hidden) + 2 * v * d
        per_token = 8 * (int(m.context) * d + 2 * int(m.hidden) + d + 2 * v)
    else:
        # swiglu's width is at most 1.5x gelu's here, before its rounding up to mlp_multiple_of
        h = float(m.get("mlp_ratio", 4.0)) * d * 1.5 + int(m.get("mlp_multiple_of", 1))
        weights = int(m.n_layer) * (4 * d * d + 3 * h * d + 16 * d) + 2 * v * d + int(m.block_size) * d
        per_token = 8 * (int(m.n_layer) * (24 * d + 4 * h + int(m.n_head)) + 2 * v + 4 * d)
    return 16.0 * weights + tokens * per_token


def _check_memory(cfg: DictConfig) -> list[str]:
    from costlab.measure.memory import PREDICTED, predict_state

    t = cfg.trainer
    if t.device == "cpu":
        available, where, ranks = cpu_memory_available(), "available on this machine", int(t.nproc_per_node)
    elif t.device == "cuda" and cfg.get("hardware", {}).get("memory_gb"):
        available, where, ranks = int(cfg.hardware.memory_gb * 1e9), f"of one {cfg.hardware.name} GPU", 1
    else:
        return []
    if not available:
        return []
    if ranks * rough_upper_bound(cfg) < SKIP_BELOW * available:
        return []  # far from the limit: spare the launcher the exact prediction (and importing torch)
    state = predict_state(cfg, int(t.nnodes * t.nproc_per_node))  # a validated layout: a failure here is a bug
    acts = state.get(f"{PREDICTED}activations_bytes_per_rank", 0.0)
    need = ranks * sum(state.values())
    who = f"{ranks} rank(s) x " if ranks > 1 else ""
    numbers = (f"predicted {need / GIB:.2f} GiB ({who}{sum(state.values()) / GIB:.2f} GiB: activations "
               f"{acts / GIB:.2f}, parameters + gradients + AdamW {(sum(state.values()) - acts) / GIB:.2f}), "
               f"{available / GIB:.2f} GiB {where}")
    if need > available:
        if acts >= need / ranks / 2:  # the batch's activations dominate: cutting them is the lever
            raise ConfigError("trainer.batch_size", t.batch_size, f"does not fit: {numbers}; lower trainer.batch_size"
                              ", raise trainer.grad_accum_steps or set trainer.activation_checkpointing=full")
        raise ConfigError("model", cfg.model.get("name", "?"), f"does not fit: {numbers}; choose a smaller model"
                          " (with several ranks per node, parallelism=fsdp holds one copy of the state, not one per "
                          "rank)")
    if need > WARN_FRACTION * available:
        return [f"memory is tight: {numbers} ({need / available:.0%})"]
    return []
