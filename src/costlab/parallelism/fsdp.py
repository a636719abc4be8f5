"""``fsdp`` (degree ``dp_shard``): FSDP2 ``fully_shard``, parameters, gradients and optimizer state
sharded over the data-parallel ranks, ZeRO-3 style."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from costlab.models.gpt import has_blocks


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
    offload: str = "none",
    cast_block_inputs: bool = True,
) -> None:
    """FSDP2 on each block (its own all-gather / reduce-scatter unit, so communication overlaps the
    neighbouring block's compute), then on the root for the embeddings, final norm and head.

    The precision group becomes the mixed-precision policy: parameters all-gathered and computed in
    ``param_dtype`` (bf16 or fp16; None keeps fp32), gradients reduced in ``reduce_dtype``. ``offload="cpu"``:
    FSDP2's ``CPUOffloadPolicy``, the shards (and so the optimizer's state and step) in host memory, each block's
    parameters copied to the GPU when gathered. ``cast_block_inputs=False``: the blocks take their inputs as they
    come (selective checkpointing: FSDP2 prepends its pre-forward hook, so its input cast runs outside a block's
    checkpointed forward but inside its recompute, which selective checkpointing refuses as a mismatch; a block's
    hidden states already come in ``param_dtype``, from the gathered embedding and blocks before it).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=policy.reduce_dtype,
                                        cast_forward_inputs=cast_block_inputs)
    where = CPUOffloadPolicy() if offload == "cpu" else OffloadPolicy()
    if has_blocks(model):
        for block in model.blocks.values():
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=block_policy,
                        offload_policy=where)
    # the root keeps FSDP's default: not resharded, since backward needs its head first
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, offload_policy=where)
