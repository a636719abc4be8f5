"""``ddp`` (degree ``dp_replicate``): every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from costlab.models.adapters import is_nf4
from costlab.parallelism.core import Parallel, plain_copy


def apply_ddp(
    model: nn.Module, dp_group: dist.ProcessGroup, device: torch.device, bucket_cap_mb: float
) -> DistributedDataParallel:
    # a frozen NF4 base (finetune=qlora) is built alike on every rank and never changes: DDP neither broadcasts
    # nor reduces it (its packed codes are no tensors a collective can take whole)
    model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if is_nf4(p)]
    # each gradient a view into its all-reduce bucket: the reducer's buckets are the gradients, not a second copy of
    # them (on a 100M-parameter model, 403 MB less a rank after its first backward), and no copy into the buckets
    return DistributedDataParallel(
        model,
        process_group=dp_group,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        gradient_as_bucket_view=True,
    )


class DataParallel(Parallel):
    """A DDP replica: gradients are all-reduced only after the last micro-batch of a step."""

    def __init__(self, ddp: DistributedDataParallel, device: torch.device, rebuild: bool,
                 dp_rank: int, dp_size: int, dp_group: dist.ProcessGroup):
        super().__init__(ddp, device, rebuild, dp_rank, dp_size, dp_group)
        self.inner = ddp.module

    def sync_gradients(self, last_microbatch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_microbatch else self.model.no_sync()

    def gradients_to_none(self, cfg: DictConfig) -> bool:
        """Not when a step accumulates micro-batches: each gradient is a view into DDP's all-reduce bucket (held for
        the run), and a backward under ``no_sync`` makes a gradient set to None anew beside its bucket, a second copy
        of every gradient until the step's last micro-batch; zeroed where they are, they accumulate in the buckets."""
        return int(cfg.trainer.grad_accum_steps) == 1

    def full_model(self, cfg) -> nn.Module | None:
        if dist.get_rank() != 0:
            return None
        return plain_copy(self.inner, cfg, self.device) if self.rebuild else self.inner
