"""Per-block training techniques that trade compute for memory or speed, applied by
:func:`costlab.parallelism.apply.apply_parallelisms` in torchtitan's order: float8 → tensor parallel →
activation checkpointing → compile → FSDP / DDP (float8 lives in :mod:`costlab.precision`; tensor parallel,
FSDP and DDP in their option's module).

All of them act in place and keep parameter names, so state dicts stay those of a plain model.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from costlab.models.gpt import has_blocks


def _selective_policy():
    """Keep the outputs of matmuls and attention (expensive to redo), recompute the cheap pointwise
    and normalisation ops between them: most of full checkpointing's saving for little recompute."""
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    # the reduce-scatter of sequence-parallel / FSDP outputs is communication: never redo it
    save.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_ac(model: nn.Module, mode: str) -> None:
    """``trainer.activation_checkpointing``: full (recompute each block in backward) or selective.

    The composable ``checkpoint`` works through hooks, so names and wrappers stay as they were.
    """
    kwargs = {}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy())
    for block in model.blocks.values():
        checkpoint(block, **kwargs)


def fsdp_casts_block_inputs(mode: str) -> bool:
    """Whether FSDP's mixed precision casts each block's floating inputs under ``trainer.activation_checkpointing``
    = ``mode`` (:func:`costlab.parallelism.fsdp.apply_fsdp`'s ``cast_block_inputs``): not under selective
    checkpointing, which refuses FSDP's cast as a mismatch between the forward and its recompute. The memory
    model's traces cast as the run does (:mod:`costlab.measure.traced`)."""
    return mode != "selective"


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` per block (the blocks are identical, so one compilation serves them all), or
    the whole model when it has no blocks. ``Module.compile`` compiles in place: parameter names keep
    no ``_orig_mod`` prefix."""
    if has_blocks(model):
        for block in model.blocks.values():
            block.compile()
    else:
        model.compile()
