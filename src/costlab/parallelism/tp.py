"""``tp`` (degree ``tp_degree``): Megatron-style tensor parallel with DTensor."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard

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
            param.register_post_accumulate_grad_hook(_grad_as_param)
        return module


def _grad_as_param(param: torch.Tensor) -> None:
    """A gradient DTensor left in another placement than its parameter's (partial, or sharded where the parameter
    is replicated) redistributed to the parameter's, once accumulated, so the optimizer meets one placement."""
    if param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(placements=param.placements)


class _RowsLookup(torch.autograd.Function):
    """A lookup in a rank's rows ``[start, start + len(weight))`` of a table split by rows: ids outside them give
    zeros (the ranks' outputs sum to the whole table's). Its backward makes the gradient of the rank's rows alone
    with the kernel ``nn.Embedding``'s backward runs (the ids outside, their gradient zeroed, sent to row 0; no
    boolean indexing, which would wait for a GPU), from the ids it saved (a view of the batch, nothing new):
    DTensor's embedding backward would make the whole table's gradient on every rank."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, start: int, padding_idx: int | None) -> torch.Tensor:
        rows = weight.shape[0]
        ctx.save_for_backward(ids)
        ctx.start, ctx.rows, ctx.padding_idx = start, rows, padding_idx
        if rows == 0:
            return weight.new_zeros(*ids.shape, weight.shape[1])
        outside = (ids < start) | (ids >= start + rows)
        out = F.embedding((ids - start).masked_fill_(outside, 0), weight)
        return out.masked_fill_(outside.unsqueeze(-1), 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        (ids,) = ctx.saved_tensors
        start, rows, padding = ctx.start, ctx.rows, ctx.padding_idx
        if rows == 0:
            return None, grad.new_zeros(0, grad.shape[-1]), None, None
        outside = (ids < start) | (ids >= start + rows)
        local_padding = padding - start if padding is not None and start <= padding < start + rows else -1
        weight_grad = torch.ops.aten.embedding_dense_backward(
            grad.masked_fill(outside.unsqueeze(-1), 0), (ids - start).masked_fill_(outside, 0), rows, local_padding,
            False)
        return None, weight_grad, None, None


def _rows_forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """:class:`_RowwiseEmbedding`'s forward: the rank's rows looked up, the ranks' outputs summed (all-reduced)."""
    weight = module.weight  # under FSDP its gathered tensor-parallel shard
    mesh = weight.device_mesh
    start = min(mesh.get_local_rank() * -(-weight.shape[0] // mesh.size()), weight.shape[0])  # torch.chunk's rows
    out = _RowsLookup.apply(ids, weight.to_local(), start, module.padding_idx)
    return DTensor.from_local(out, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


class _RowwiseEmbedding(ParallelStyle):
    """An embedding split by rows (over the vocabulary or the positions), as Megatron-LM's vocabulary-parallel
    embedding: each rank holds a slice of the rows (``Shard(0)``, the remainder on the first ranks, as DTensor
    splits them), looks up the ids that fall in it, and the outputs are all-reduced; each rank's gradient is its
    rows' (:class:`_RowsLookup`). ``RowwiseParallel`` on an embedding computes the same outputs, but DTensor's
    embedding backward has no strategy for a row-split weight and makes the whole table's gradient on every rank:
    Llama 3 8B's 2.1 GB of fp32 gradient on each tensor-parallel rank, held through the optimizer's step. A
    plain ``nn.Embedding`` only (no ``max_norm``, not sparse; every family tensor parallel splits has one)."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        if type(module) is not nn.Embedding or module.max_norm is not None or module.sparse:
            raise ValueError(f"tensor parallel splits a plain nn.Embedding by rows, not {module!r}")
        weight = distribute_tensor(module.weight, mesh, [Shard(0)])
        module.register_parameter("weight", nn.Parameter(weight, requires_grad=module.weight.requires_grad))
        module.forward = partial(_rows_forward, module)
        return module


# GPT-2's c_attn packs all queries, then all keys, then all values (``qkv_colwise``): a rank takes its heads of each
QKV_PARTS = 3


class _Conv1DColwise(ColwiseParallel):
    """Column-wise for transformers' ``Conv1D`` (GPT-2's projections, ``x @ weight + bias`` with a weight of inputs x
    outputs): the weight split on dim 1, the bias on dim 0. A packed projection's weight (``parts`` > 1: GPT-2's
    c_attn) is split part by part, each rank holding its share of each part, side by side: DTensor's
    ``_StridedShard``, whose whole tensor (``full_tensor``, the saved model) is the module's own layout. Its bias
    stays whole on every rank (a vector; each rank adds its share): FSDP would shard a part-by-part split bias again
    on the same dim, a layout DTensor cannot describe (its whole tensor comes out scrambled). Its gradient, which
    comes back split as the outputs are, is all-gathered once accumulated instead (FSDP's reduction does the same
    where FSDP holds it): one small all-gather a layer."""

    def __init__(self, parts: int = 1):
        super().__init__()
        self.parts = parts

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for key, param in list(mod.named_parameters(recurse=False)):
                if self.parts == 1:
                    placement = Shard(1 if key == "weight" else 0)
                else:
                    placement = _StridedShard(1, split_factor=self.parts) if key == "weight" else Replicate()
                dist = distribute_tensor(param, mesh, [placement], src_data_rank=self.src_data_rank)
                mod.register_parameter(key, nn.Parameter(dist, requires_grad=param.requires_grad))
                if self.parts > 1 and key == "bias":  # its gradient comes back split as the outputs are
                    mod.bias.register_post_accumulate_grad_hook(_grad_as_param)

        def local(mod: nn.Module, outputs: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            return outputs.to_local()  # this rank's outputs: whole heads (of each part)

        return distribute_module(module, mesh, partition,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 local)


class _Conv1DRowwise(RowwiseParallel):
    """Row-wise for transformers' ``Conv1D``: the weight split on dim 0 (its inputs), the bias replicated; the
    partial outputs all-reduced."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for key, param in list(mod.named_parameters(recurse=False)):
                placement = Shard(0) if key == "weight" else Replicate()
                dist = distribute_tensor(param, mesh, [placement], src_data_rank=self.src_data_rank)
                mod.register_parameter(key, nn.Parameter(dist, requires_grad=param.requires_grad))

        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(module, mesh, partition,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def rank_packed_attention(owner: nn.Module, tp: int) -> None:
    """GPT-2's attention cuts c_attn's output into queries, keys and values at ``split_size`` (its width); a rank's
    part is 1/tp of it (the attention's reshapes take ``-1`` heads)."""
    owner.split_size //= tp


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
        plan["wte"] = _RowwiseEmbedding()
    if model.wpe is not None:
        plan["wpe"] = _RowwiseEmbedding()
    if model.ln_f is not None:
        plan["ln_f"] = _Replicated()
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    if tied:
        # both styles shard the (vocab, n_embd) matrix on dim 0: one DTensor can serve both again
        model.lm_head.weight = model.wte.weight


def _split_block(block: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, str], colwise, rowwise) -> None:
    """Lay one block out by ``plan`` (submodule -> "replicate", "colwise", "qkv_colwise", "rowwise" or
    "per_head"); transformers' ``Conv1D`` projections (GPT-2's) by their own column- and row-wise styles."""
    styles = {"replicate": _Replicated, "colwise": colwise, "rowwise": rowwise, "per_head": _PerHead}
    conv = {"colwise": _Conv1DColwise, "qkv_colwise": partial(_Conv1DColwise, QKV_PARTS), "rowwise": _Conv1DRowwise}
    chosen = {}
    for name, style in plan.items():
        module = block.get_submodule(name)
        chosen[name] = (conv if type(module).__name__ == "Conv1D" else styles)[style]()
        if style == "qkv_colwise":
            rank_packed_attention(block.get_submodule(name.rpartition(".")[0]), tp_mesh.size())
    parallelize_module(block, tp_mesh, chosen)


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
    return styles.count("rowwise"), styles.count("colwise") + styles.count("qkv_colwise"), styles.count("per_head")


def hf_layer_plan(model_type: str) -> dict[str, str]:
    """The split of one decoder layer of a ``model=hf`` model of transformers' ``model_type``
    (:data:`costlab.models.hf_config.TP_LAYER_PLANS`; the launcher refuses the others)."""
    from costlab.models.hf_config import TP_LAYER_PLANS

    return TP_LAYER_PLANS[model_type]


def apply_hf_tp(model: nn.Module, tp_mesh: DeviceMesh, colwise=ColwiseParallel, rowwise=RowwiseParallel) -> None:
    """Tensor parallel for a ``model=hf`` model of a family in :data:`costlab.models.hf_config.TP_LAYER_PLANS`:
    each rank holds whole query heads and whole key/value groups (their projections column-wise, GPT-NeoX's fused
    per-head query_key_value too, GPT-2's packed c_attn part by part; the attention's output projection row-wise)
    and a slice of the MLP (its input projections column-wise, its output projection row-wise). The attention
    reshapes with ``-1`` heads and repeats each key/value head ``num_attention_heads // num_key_value_heads`` times,
    a ratio the split keeps. The embedding is split over the vocabulary, the head's logits all-gathered, the final
    norm (and GPT-2's position embedding) replicated."""
    plan = hf_layer_plan(model.hf.config.model_type)
    for block in model.blocks.values():
        _split_block(block, tp_mesh, plan, colwise, rowwise)
    # a pipeline stage holds the embedding, or the final norm and the head, or neither
    base, embedding, head = model.hf.get_decoder(), model.wte, model.lm_head
    layers = decoder_layers(model.hf)
    children = list(base.children())
    # before the layers: the embedding, GPT-2's learned positions; after: the final norm (a stage before the last:
    # an Identity; rotary tables hold no weights)
    rest = [m for i, m in enumerate(children) if i != children.index(layers) and m is not embedding]
    if embedding is not None:
        parallelize_module(embedding, tp_mesh, _RowwiseEmbedding())
    for module in rest:  # replicated: positions are few, a norm's weights a vector
        if any(True for _ in module.parameters()):
            parallelize_module(module, tp_mesh, _Replicated())
    if head is not None:
        parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if model.hf.config.tie_word_embeddings and embedding is not None and head is not None:
        head.weight = embedding.weight  # both styles shard the (vocab, width) matrix on dim 0
