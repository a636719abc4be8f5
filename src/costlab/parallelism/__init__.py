"""The ``parallelism`` group: the process group, and one ``apply_*`` function per option.

Each option turns a freshly built model into a :class:`Parallel`: the module the optimizer trains,
which slice of the global batch this rank takes, and how to bring the trained weights back into one
plain module on rank 0 for compression, evaluation and saving.

    single, ddp        here
    fsdp, tp, fsdp_tp  sharded.py   (DTensor: FSDP2 fully_shard, tensor parallel, both on a 2-D mesh)
    pp                 pipeline.py  (torch.distributed.pipelining)

Every option applies the training techniques of ``techniques.py`` (float8, activation checkpointing,
per-block compile) in torchtitan's order: float8 → TP → AC → compile → FSDP / DDP.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import nn

from costlab.parallelism.core import DistEnv, Parallel, init_distributed, plain_copy
from costlab.parallelism.pipeline import apply_pp
from costlab.parallelism.sharded import apply_fsdp, apply_fsdp_tp, apply_tp
from costlab.parallelism.techniques import prepare

__all__ = ["APPLY", "DistEnv", "Parallel", "init_distributed", "parallelize"]


def apply_single(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    changed = prepare(model, cfg)
    model.to(env.device)
    return Parallel(model=model, full_model=lambda: plain_copy(model, cfg, env.device) if changed else model)


def apply_ddp(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    from torch.nn.parallel import DistributedDataParallel as DDP

    changed = prepare(model, cfg)
    model.to(env.device)
    ddp = DDP(
        model,
        device_ids=[env.local_rank] if env.device.type == "cuda" else None,
        bucket_cap_mb=cfg.parallelism.get("bucket_cap_mb", 25),
    )

    def full_model() -> nn.Module | None:
        if not env.is_main:
            return None
        return plain_copy(model, cfg, env.device) if changed else model

    return Parallel(model=ddp, dp_rank=env.rank, dp_size=env.world_size, no_sync=ddp.no_sync, full_model=full_model)


APPLY: dict[str, Callable[[nn.Module, DictConfig, DistEnv], Parallel]] = {
    "single": apply_single,
    "ddp": apply_ddp,
    "fsdp": apply_fsdp,
    "tp": apply_tp,
    "pp": apply_pp,
    "fsdp_tp": apply_fsdp_tp,
}


def parallelize(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    return APPLY[cfg.parallelism.name](model, cfg, env)
