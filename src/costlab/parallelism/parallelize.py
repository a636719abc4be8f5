"""The entry point: a freshly built model spread over the ranks as the degrees say."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from costlab.models.adapters import uses_adapters
from costlab.parallelism.apply import apply_parallelisms, build_mesh, data_parallel_group
from costlab.parallelism.core import DistEnv, Parallel, ShardedParallel
from costlab.parallelism.ddp import DataParallel, apply_ddp
from costlab.parallelism.dims import parallel_dims


def parallelize(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    """Spread a freshly built model over the ranks as ``cfg.parallelism``'s degrees say."""
    dims = parallel_dims(cfg.parallelism, env.world_size)
    mesh = build_mesh(dims, env.device.type)
    if dims.pp_enabled:
        from costlab.parallelism.pp import PipelineParallel  # imported when used (see apply.py)

        return PipelineParallel(model, cfg, env, dims, mesh)
    # adapters are a training device too: the shipped model has them merged (costlab.models.adapters)
    rebuild = apply_parallelisms(model, cfg, dims, mesh, env.device) or uses_adapters(cfg)
    dp = data_parallel_group(dims, mesh)
    if dims.fsdp_enabled:  # with dp_replicate: HSDP, FSDP2's replicas (apply.shard_mesh)
        return ShardedParallel(model, env.device, rebuild, *dp)
    if dims.ddp_enabled:
        ddp = apply_ddp(model, dp[2], env.device, cfg.parallelism.get("bucket_cap_mb", 25))
        return DataParallel(ddp, env.device, rebuild, *dp)
    if dims.tp_enabled:
        return ShardedParallel(model, env.device, rebuild)
    return Parallel(model, env.device, rebuild)
