"""The one recipe: float8 → tensor parallel → activation checkpointing → compile → FSDP, in that visible
order, on a whole model or on one pipeline stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from costlab.parallelism.dims import ParallelDims
from costlab.parallelism.techniques import apply_ac, apply_compile, fsdp_casts_block_inputs
from costlab.precision import apply_fp8, autocast_dtype, trains_in_float8


@contextlib.contextmanager
def fake_group(rank: int, world: int) -> Iterator[None]:
    """PyTorch's fake process group, as ``rank`` of ``world``: no peers, each collective local (an all-gather repeats
    this rank's shard, a reduce-scatter keeps its first share, an all-reduce its own), so a model is laid out, and
    can run, as that rank would lay it out and run it, without them. The process must have no process group yet;
    it has none after. DTensor's sharding propagation caches are emptied on the way in and out: they key a mesh by
    its shape and names, not its groups, and would hand a later group at another rank this one's."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    _clear_dtensor_caches()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
        _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """What ``torch.distributed.tensor.debug._clear_sharding_prop_cache`` empties (the Python propagator's cache and
    the C++ fast path's), without importing that module: its communication-mode tools take half a second to import,
    on the main rank's path before the others can start. A PyTorch whose propagator keeps them elsewhere goes
    through the module."""
    from torch.distributed.tensor import DTensor

    try:
        cached = DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear
    except AttributeError:
        try:
            from torch.distributed.tensor.debug import _clear_sharding_prop_cache
        except ImportError:  # an older PyTorch: its caches are what they are
            return
        _clear_sharding_prop_cache()
        return
    cached()
    fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)  # where a C++ fast path exists
    if fast_path is not None:
        fast_path()


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """One mesh with a named dimension per enabled degree (None on a single rank)."""
    names, sizes = dims.mesh_dims()
    return init_device_mesh(device_type, sizes, mesh_dim_names=names) if names else None


def shard_mesh(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP, FSDP2's hybrid sharding
    (each replica's ranks shard the state; gradients are reduce-scattered within a replica, then all-reduced across
    replicas)."""
    return mesh["dp_replicate", "dp_shard"] if dims.hsdp_enabled else mesh["dp_shard"]


def data_parallel_group(dims: ParallelDims, mesh: DeviceMesh | None) -> tuple[int, int, Any]:
    """(this rank's index, the size, the process group) of the ranks that cut the global batch between them:
    ``dp_replicate`` x ``dp_shard`` (HSDP's two degrees flattened into one group); (0, 1, None) where that is one
    rank."""
    if mesh is None or dims.dp == 1:
        return 0, 1, None
    if dims.hsdp_enabled:
        dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    else:
        dp = mesh["dp_replicate" if dims.ddp_enabled else "dp_shard"]
    return dp.get_local_rank(), dp.size(), dp.get_group()


def apply_parallelisms(
    model: nn.Module, cfg: DictConfig, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device
) -> bool:
    """float8 → tensor parallel → activation checkpointing → compile → FSDP on ``model`` (the whole model,
    or one pipeline stage), in place. Returns whether the trained module now carries training devices
    that the shipped model must not inherit."""
    model.to(device)
    fp8 = trains_in_float8(cfg)
    ac = cfg.trainer.get("activation_checkpointing", "none")
    compile_ = bool(cfg.trainer.get("compile", False))
    if fp8:
        apply_fp8(model, cfg)
    # FSDP, TP and the pipeline are imported where they are used: their modules (DTensor, FSDP2,
    # pipelining) take seconds to import, which a single-rank job would pay on every start
    if dims.tp_enabled:
        from costlab.parallelism.tp import apply_tp

        apply_tp(model, mesh["tp"], float8=fp8)
    if ac != "none":
        apply_ac(model, ac)
    if compile_:
        apply_compile(model)
    if dims.fsdp_enabled:
        from costlab.parallelism.fsdp import apply_fsdp

        reshard = bool(cfg.parallelism.get("reshard_after_forward", True))
        apply_fsdp(model, shard_mesh(dims, mesh), autocast_dtype(cfg), torch.float32, reshard,
                   str(cfg.parallelism.get("offload", "none")), cast_block_inputs=fsdp_casts_block_inputs(ac))
    return fp8 or ac != "none" or compile_
