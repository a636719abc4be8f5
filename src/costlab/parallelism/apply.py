"""The one recipe: float8 → tensor parallel → activation checkpointing → compile → FSDP, in that visible
order, on a whole model or on one pipeline stage."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from costlab.parallelism.dims import ParallelDims
from costlab.parallelism.techniques import apply_ac, apply_compile
from costlab.precision import apply_fp8, autocast_dtype, trains_in_float8


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """One mesh with a named dimension per enabled degree (None on a single rank)."""
    names, sizes = dims.mesh_dims()
    return init_device_mesh(device_type, sizes, mesh_dim_names=names) if names else None


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
        apply_fsdp(model, mesh["dp_shard"], autocast_dtype(cfg), torch.float32, reshard,
                   str(cfg.parallelism.get("offload", "none")))
    return fp8 or ac != "none" or compile_
