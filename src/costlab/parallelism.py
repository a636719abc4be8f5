"""The ``parallelism`` group: the process group, and one ``apply_*`` function per option.

Each option turns a freshly built model into a :class:`Parallel`: the module the optimizer trains,
which slice of the global batch this rank takes, and how to bring the trained weights back into one
plain module on rank 0 for compression, evaluation and saving.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DictConfig) -> DistEnv:
    """Join the process group torchrun set up: gloo on CPU, nccl on GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cfg.trainer.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # equal cores per local rank: runs at different world sizes use the same hardware
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(minutes=30), device_id=device if backend == "nccl" else None
        )
    return DistEnv(rank, local_rank, world, local_world, device)


@dataclass
class Parallel:
    """What the trainer needs to know about a parallelised model."""

    model: nn.Module  # the module the optimizer trains and the forward pass calls
    dp_rank: int = 0  # which slice of the global batch this rank takes
    dp_size: int = 1  # how many slices the global batch is cut into
    has_loss: bool = True  # this rank computes the loss (false on early pipeline stages)
    dp_group: dist.ProcessGroup | None = None  # the group the logged loss is averaged over
    # gradient-sync suppression for all but the last micro-batch (DDP's no_sync)
    no_sync: Callable[[], object] | None = None
    # returns the full trained model on rank 0 (None elsewhere); every rank must call it
    full_model: Callable[[], nn.Module | None] = field(default=lambda: None)
    # overrides for schemes whose step is not "forward, loss, backward" (pipelining):
    # forward_backward(parallel, x, y, cfg, scaler) -> mean loss of this rank
    forward_backward: Callable | None = None
    # reduce_loss(loss) -> the global mean loss, valid on rank 0
    reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    # evaluate(batches) -> mean validation loss, called on every rank
    evaluate: Callable | None = None


def apply_single(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    model.to(env.device)
    return Parallel(model=model, full_model=lambda: model)


def apply_ddp(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model.to(env.device)
    ddp = DDP(
        model,
        device_ids=[env.local_rank] if env.device.type == "cuda" else None,
        bucket_cap_mb=cfg.parallelism.get("bucket_cap_mb", 25),
    )
    return Parallel(
        model=ddp,
        dp_rank=env.rank,
        dp_size=env.world_size,
        no_sync=ddp.no_sync,
        full_model=lambda: model if env.is_main else None,
    )


APPLY: dict[str, Callable[[nn.Module, DictConfig, DistEnv], Parallel]] = {
    "single": apply_single,
    "ddp": apply_ddp,
}


def parallelize(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    return APPLY[cfg.parallelism.name](model, cfg, env)
