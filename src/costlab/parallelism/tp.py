"""``tp`` (degree ``tp_degree``): Megatron-style tensor parallel with DTensor."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle


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
    """Lay one block out by ``plan`` (submodule -> "replicate", "colwise" or "rowwise")."""
    styles = {"replicate": _Replicated, "colwise": colwise, "rowwise": rowwise}
    parallelize_module(block, tp_mesh, {name: styles[style]() for name, style in plan.items()})


def gpt_layer_plan(swiglu: bool) -> dict[str, str]:
    """The split of one of costlab's GPT blocks, by submodule (a SwiGLU MLP's second input projection too)."""
    plan = {"ln_1": "replicate", "ln_2": "replicate", "attn.c_q": "colwise", "attn.c_k": "colwise",
            "attn.c_v": "colwise", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}
    return {**plan, "mlp.c_fc2": "colwise"} if swiglu else plan


def layer_all_reduces(plan: dict[str, str]) -> tuple[int, int]:
    """(forward, backward) all-reduces of one block split by ``plan``: each row-wise projection's partial output in
    forward, each column-wise projection's input gradient in backward. DTensor reduces each of those apart, the
    q, k and v projections' (and gate's and up's) too, where Megatron's fused projections reduce one a sublayer."""
    styles = list(plan.values())
    return styles.count("rowwise"), styles.count("colwise")


# Llama-style decoder layers (Llama, Qwen2, Mistral and their kin): the same split as costlab's blocks
HF_LAYER_PLAN = {
    "input_layernorm": "replicate", "post_attention_layernorm": "replicate",
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}


def apply_hf_tp(model: nn.Module, tp_mesh: DeviceMesh, colwise=ColwiseParallel, rowwise=RowwiseParallel) -> None:
    """Tensor parallel for a ``model=hf`` Llama-style model: each rank holds whole query heads and whole
    key/value groups (their projections column-wise, ``o_proj`` row-wise) and a slice of the MLP (gate
    and up column-wise, down row-wise). The attention reshapes with ``-1`` heads and repeats each
    key/value head ``num_attention_heads // num_key_value_heads`` times, a ratio the split keeps.
    The embedding is split over the vocabulary, the head's logits all-gathered, the final norm replicated."""
    for block in model.blocks.values():
        _split_block(block, tp_mesh, HF_LAYER_PLAN, colwise, rowwise)
    base = model.hf.get_decoder()
    prefix = next(n for n, m in model.hf.named_children() if m is base)  # "model" in these families
    plan = {}  # a pipeline stage holds the embedding, or the norm and the head, or neither
    if base.embed_tokens is not None:
        plan[f"{prefix}.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if not isinstance(base.norm, nn.Identity):
        plan[f"{prefix}.norm"] = _Replicated()
    if model.hf.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    if plan:
        parallelize_module(model.hf, tp_mesh, plan)
    tied = model.hf.config.tie_word_embeddings and base.embed_tokens is not None and model.hf.lm_head is not None
    if tied:  # both styles shard the (vocab, width) matrix on dim 0
        model.hf.lm_head.weight = base.embed_tokens.weight
