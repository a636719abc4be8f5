"""``tp`` (degree ``tp_degree``): Megatron-style tensor parallel with DTensor."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from costlab.models.hf import decoder_layers


class _Replicated(ParallelStyle):
    """A parallel style for modules TP does not split (norms): parameters become replicated
    DTensors, activations stay plain tensors. Every parameter is then a DTensor on the TP mesh, so
    optimizer ``foreach`` kernels, the gradient scaler and FSDP's 2-D sharding see one mesh."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

        def to_local(mod, outputs, mesh):
            return outputs.to_local()

        return distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_local)


class _PerHead(ParallelStyle):
    """A module that acts on each head apart (Qwen3's q/k norms, over the head dimension), fed a rank's own heads:
    its input a shard of every head (dim 2 of batch x tokens x heads x head dim), its weights replicated. Their
    gradient, a sum over the heads, is partial on each rank; once accumulated it is all-reduced (FSDP's reduction
    does the same where FSDP holds the weights: it redistributes each gradient to its tensor-parallel placement)."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        module = SequenceParallel(sequence_dim=2, use_local_output=True)._apply(module, mesh)
        for param in module.parameters():
            param.register_post_accumulate_grad_hook(_replicate_grad)
        return module


def _replicate_grad(param: torch.Tensor) -> None:
    if any(p.is_partial() for p in param.grad.placements):
        param.grad = param.grad.redistribute(placements=[Replicate()] * len(param.grad.placements))


def _styles(float8: bool):
    if float8:  # float8 linears need the float8-aware styles (they all-gather in float8)
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

        return Float8ColwiseParallel, Float8RowwiseParallel
    return ColwiseParallel, RowwiseParallel


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, float8: bool = False) -> None:
    """Megatron-style TP: q/k/v and the MLP's first layer column-wise (each rank holds whole heads and
    a slice of the hidden units), the two output projections row-wise (one all-reduce each).

    The embeddings are split over the vocabulary / positions (row-wise, output all-reduced), the
    output head over the vocabulary (column-wise, logits all-gathered). Activations between blocks
    are replicated: no sequence parallel, so the loss is the single-device loss up to summation order.
    """
    colwise, rowwise = _styles(float8)
    if getattr(model, "hf", None) is not None:
        apply_hf_tp(model, tp_mesh, colwise, rowwise)
        return
    for block in model.blocks.values():
        _split_block(block, tp_mesh, gpt_layer_plan(getattr(block.mlp, "swiglu", False)), colwise, rowwise)

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


def _split_block(block: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str], colwise, rowwise) -> None:
    """Lay one block out by ``plan`` (submodule -> "replicate", "colwise", "rowwise" or "per_head")."""
    styles = {"replicate": _Replicated, "colwise": colwise, "rowwise": rowwise, "per_head": _PerHead}
    parallelize_module(block, tp_mesh, {name: styles[style]() for name, style in plan.items()})


def gpt_layer_plan(swiglu: bool) -> dict[str, str]:
    """The split of one of costlab's GPT blocks, by submodule (a SwiGLU MLP's second input projection too)."""
    plan = {"ln_1": "replicate", "ln_2": "replicate", "attn.c_q": "colwise", "attn.c_k": "colwise",
            "attn.c_v": "colwise", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}
    return {**plan, "mlp.c_fc2": "colwise"} if swiglu else plan


def layer_all_reduces(plan: dict[str, str]) -> tuple[int, int, int]:
    """(forward, backward, weight gradient) all-reduces of one block split by ``plan``: each row-wise projection's
    partial output in forward, each column-wise projection's input gradient in backward. DTensor reduces each of
    those apart, the q, k and v projections' (and gate's and up's) too, where Megatron's fused projections reduce one
    a sublayer. And each per-head module's weight gradient (:class:`_PerHead`), once a backward."""
    styles = list(plan.values())
    return styles.count("rowwise"), styles.count("colwise"), styles.count("per_head")


def hf_layer_plan(model_type: str) -> dict[str, str]:
    """The split of one decoder layer of a ``model=hf`` model of transformers' ``model_type``
    (:data:`costlab.models.hf_config.TP_LAYER_PLANS`; the launcher refuses the others)."""
    from costlab.models.hf_config import TP_LAYER_PLANS

    return TP_LAYER_PLANS[model_type]


def apply_hf_tp(model: nn.Module, tp_mesh: DeviceMesh, colwise=ColwiseParallel, rowwise=RowwiseParallel) -> None:
    """Tensor parallel for a ``model=hf`` model of a family in :data:`costlab.models.hf_config.TP_LAYER_PLANS`:
    each rank holds whole query heads and whole key/value groups (their projections column-wise, GPT-NeoX's fused
    per-head query_key_value too; the attention's output projection row-wise) and a slice of the MLP (its input
    projections column-wise, its output projection row-wise). The attention reshapes with ``-1`` heads and repeats
    each key/value head ``num_attention_heads // num_key_value_heads`` times, a ratio the split keeps.
    The embedding is split over the vocabulary, the head's logits all-gathered, the final norm replicated."""
    plan = hf_layer_plan(model.hf.config.model_type)
    for block in model.blocks.values():
        _split_block(block, tp_mesh, plan, colwise, rowwise)
    # a pipeline stage holds the embedding, or the final norm and the head, or neither
    base, embedding, head = model.hf.get_decoder(), model.wte, model.lm_head
    layers = decoder_layers(model.hf)
    after = list(base.children())
    after = after[after.index(layers) + 1:]  # the final norm (a stage before the last: an Identity; rotary: no weights)
    if embedding is not None:
        parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    for norm in after:
        if any(True for _ in norm.parameters()):
            parallelize_module(norm, tp_mesh, _Replicated())
    if head is not None:
        parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if model.hf.config.tie_word_embeddings and embedding is not None and head is not None:
        head.weight = embedding.weight  # both styles shard the (vocab, width) matrix on dim 0
