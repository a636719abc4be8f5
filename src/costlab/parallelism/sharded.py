"""The DTensor options: ``fsdp`` (FSDP2 ``fully_shard``), ``tp`` (tensor parallel) and ``fsdp_tp``
(a 2-D mesh: data-parallel shard × tensor parallel).

One function builds all three, in torchtitan's order: float8 → tensor parallel → activation
checkpointing → compile → FSDP. Every parameter ends up a DTensor on the same mesh, so the optimizer,
the gradient scaler and the state-dict gather treat them alike.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor.parallel.style import ParallelStyle

from costlab.parallelism.core import DistEnv, Parallel, clip_grad_norm_, has_blocks, load_full_state, sharded_evaluate
from costlab.parallelism.techniques import apply_ac, apply_compile, apply_fp8, is_fp8
from costlab.precision import autocast_dtype


def apply_fsdp(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp",))
    return _parallelize(model, cfg, env, dp_mesh=mesh["dp"], tp_mesh=None)


def apply_tp(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("tp",))
    return _parallelize(model, cfg, env, dp_mesh=None, tp_mesh=mesh["tp"])


def apply_fsdp_tp(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    from torch.distributed.device_mesh import init_device_mesh

    # tp is the inner (fastest-varying) dimension: its heavy all-reduces stay between neighbouring
    # ranks, on one node, while FSDP's all-gathers span nodes
    shape = (int(cfg.parallelism.dp_shard), int(cfg.parallelism.tp_degree))
    mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=("dp", "tp"))
    return _parallelize(model, cfg, env, dp_mesh=mesh["dp"], tp_mesh=mesh["tp"])


def _parallelize(model: nn.Module, cfg: DictConfig, env: DistEnv, dp_mesh, tp_mesh) -> Parallel:
    model.to(env.device)
    apply_fp8(model, cfg)
    if tp_mesh is not None:
        tensor_parallel(model, tp_mesh, float8=is_fp8(cfg))
    apply_ac(model, cfg)
    apply_compile(model, cfg)
    if dp_mesh is not None:
        fully_shard_model(model, dp_mesh, cfg)
    dp_rank = dp_mesh.get_local_rank() if dp_mesh is not None else 0
    dp_size = dp_mesh.size() if dp_mesh is not None else 1
    dp_group = dp_mesh.get_group() if dp_mesh is not None else None

    def full_model() -> nn.Module | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # collective: DTensors are gathered whole; with cpu_offload only rank 0 keeps the result
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return load_full_state(state, cfg, env.device) if env.is_main else None

    return Parallel(
        model=model,
        dp_rank=dp_rank,
        dp_size=dp_size,
        dp_group=dp_group,
        # FSDP reduce-scatters after every micro-batch: the accumulated gradient stays sharded, which
        # is the memory FSDP exists to save (no_sync would hold a full unsharded gradient instead)
        no_sync=None,
        full_model=full_model,
        evaluate=lambda batches: sharded_evaluate(model, batches, cfg, env.device, dp_rank, dp_size, dp_group),
        clip_grad_norm=lambda params, max_norm: clip_grad_norm_(params, max_norm),
    )


class _Replicated(ParallelStyle):
    """A parallel style for modules TP does not split (norms): parameters become replicated
    DTensors, activations stay plain tensors. Every parameter is then a DTensor on the TP mesh, so
    optimizer ``foreach`` kernels, the gradient scaler and FSDP's 2-D sharding see one mesh."""

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        from torch.distributed.tensor import DTensor, Replicate, distribute_module

        def to_dtensor(mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

        def to_local(mod, outputs, mesh):
            return outputs.to_local()

        return distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_local)


def _styles(float8: bool):
    if float8:  # float8 linears need the float8-aware styles (they all-gather in float8)
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

        return Float8ColwiseParallel, Float8RowwiseParallel
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return ColwiseParallel, RowwiseParallel


def tensor_parallel(model: nn.Module, tp_mesh, float8: bool = False) -> None:
    """Megatron-style TP: q/k/v and the MLP's first layer column-wise (each rank holds whole heads and
    a slice of the hidden units), the two output projections row-wise (one all-reduce each).

    The embeddings are split over the vocabulary / positions (row-wise, output all-reduced), the
    output head over the vocabulary (column-wise, logits all-gathered). Activations between blocks
    are replicated: no sequence parallel, so the loss is the single-device loss up to summation order.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    colwise, rowwise = _styles(float8)
    for block in model.blocks.values():
        plan = {
            "ln_1": _Replicated(),
            "ln_2": _Replicated(),
            "attn.c_q": colwise(),
            "attn.c_k": colwise(),
            "attn.c_v": colwise(),
            "attn.c_proj": rowwise(),
            "mlp.c_fc": colwise(),
            "mlp.c_proj": rowwise(),
        }
        if getattr(block.mlp, "swiglu", False):
            plan["mlp.c_fc2"] = colwise()
        parallelize_module(block, tp_mesh, plan)

    tied = model.lm_head is not None and model.wte is not None and model.lm_head.weight is model.wte.weight
    plan = {}
    if model.wte is not None:
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.wpe is not None:
        plan["wpe"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.ln_f is not None:
        plan["ln_f"] = _Replicated()
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    if tied:
        # both styles shard the (vocab, n_embd) matrix on dim 0: one DTensor can serve both again
        model.lm_head.weight = model.wte.weight


def mixed_precision_policy(cfg: DictConfig):
    """The precision group under FSDP: parameters all-gathered and computed in the autocast dtype
    (bf16, or fp16), gradients reduced in fp32; fp32 runs keep fp32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = autocast_dtype(cfg)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def fully_shard_model(model: nn.Module, dp_mesh, cfg: DictConfig) -> None:
    """FSDP2 on each block (its own all-gather / reduce-scatter unit, so communication overlaps the
    neighbouring block's compute), then on the root for the embeddings, final norm and head."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(cfg)
    reshard = bool(cfg.parallelism.get("reshard_after_forward", True))
    if has_blocks(model):
        for block in model.blocks.values():
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)
    # the root keeps FSDP's default: not resharded, since backward needs its head first
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
