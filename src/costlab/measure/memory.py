"""The memory model: the bytes each rank will hold for parameters, gradients and optimizer state,
predicted without allocating them.

The model is built on the meta device and laid out by the run's own parallelism code
(:func:`costlab.parallelism.apply.apply_parallelisms`, :func:`costlab.parallelism.pp.stage_module`)
as the ranks that hold the most will (the first rank of the first, the second and the last pipeline stage;
one rank where every rank holds the whole model), under PyTorch's fake process group (no peers, no
communication), so the local shard shapes are exactly those the run will have. From them:

    params     = sum of the local shards' bytes (fp32 master weights; a tied weight once per stage; a qlora run's
                 NF4 base weights as their codes, scales and tables, :func:`costlab.models.adapters.nf4_bytes`)
    grads      = the same for the parameters that train (an embedding tensor parallel splits by rows too: each
                 rank makes its rows' gradient alone, :class:`costlab.parallelism.tp._RowwiseEmbedding`)
    optimizer  = what the optimizer option keeps per trained tensor (its ``state_bytes``): AdamW's exp_avg and
                 exp_avg_sq (2 x 4 bytes a value) and a 4-byte step; the low-bit AdamWs' codes, block scales and
                 code tables; bf16 states; SGD's momentum buffer

each the largest over ranks, as the measured ``mem/*_bytes_per_rank`` are; and the activations of
the training step (:func:`predict_activations`), from the config's shapes alone, the loss's and the head's
backward (:func:`loss_backward_bytes`), a tied embedding's gradients at the end of backward
(:func:`tied_gradient_bytes`) and, under FSDP, what its gathered parameters and gradients add
(:func:`gathered_bytes`, from each all-gather unit's shards in the same layout); where the gradients are freed
between steps, what backward holds less than that sum, its gradients made as its activations are freed
(:func:`backward_overlap_bytes`, at most 0); and on a GPU what the optimizer's foreach step adds beyond backward's
largest moment (:func:`optimizer_step_bytes`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from omegaconf import DictConfig

from costlab.models.adapters import uses_adapters
from costlab.models.hf_config import is_hf
from costlab.models.meta import on_meta

PREDICTED = "mem/predicted_"  # + params/grads/optimizer/activations_bytes_per_rank: beside the measured figures
RECOMPUTE = PREDICTED + "recompute_bytes_per_rank"  # activation checkpointing's transient: one block rebuilt
# the loss's and the head's backward: two fp32 tokens x vocabulary tensors at once, beyond the gradients not yet
# allocated then, or the head weight's gradient beside the one it is added to (:func:`loss_backward_bytes`)
LOSS_BACKWARD = PREDICTED + "loss_backward_bytes_per_rank"
# a tied embedding and head's gradients at the end of backward, beyond the other parts (:func:`tied_gradient_bytes`)
TIED_GRADIENT = PREDICTED + "tied_gradient_bytes_per_rank"
# what FSDP's unsharded parameters and gradients add to the peak over the other parts (:func:`gathered_bytes`)
GATHERED = PREDICTED + "gathered_bytes_per_rank"
# at most 0: what a step whose gradients are freed holds less than its parts' sum, its gradients and activations never
# held whole at once (:func:`backward_overlap_bytes`)
BACKWARD_OVERLAP = PREDICTED + "backward_overlap_bytes_per_rank"
# what the optimizer's step adds to the peak over backward's largest moment (:func:`optimizer_step_bytes`)
OPTIMIZER_STEP = PREDICTED + "optimizer_step_bytes_per_rank"
FSDP = "fsdp/"  # + FSDP_PARTS: the layout's parts GATHERED is made of, never logged
HEAD = "head/"  # + numel, grad, tied: the trained output weight this rank holds, its gradient's bytes, if tied
PREDICTED_OVER_MEASURED = "mem/predicted_over_measured"  # GPU: the predicted total / max_memory_allocated in training
# on CPU, beside the measured mem/step_allocated_bytes_per_rank: what the step adds to what its rank held before it
STEP_ALLOCATED = PREDICTED + "step_allocated_bytes_per_rank"


def _stage_parts(model: Any, cfg: DictConfig, dims: Any, mesh: Any) -> list[Any]:
    if not dims.pp_enabled:
        return [model]
    from costlab.parallelism.pp import stage_module

    p = cfg.parallelism
    looped = p.get("schedule") == "interleaved_1f1b"
    n_stages = dims.pp * (int(p.stages_per_rank) if looped else 1)
    stages = list(range(mesh["pp"].get_local_rank(), n_stages, dims.pp))
    # as the run cuts them (:class:`~costlab.parallelism.pp.PipelineParallel`): the last from the model itself
    return [stage_module(copy.deepcopy(model), s, n_stages) for s in stages[:-1]] + \
        [stage_module(model, stages[-1], n_stages)]


def _rank_state(cfg: DictConfig, dims: Any, rank: int, world: int) -> dict[str, float]:
    import torch

    from costlab.models.adapters import apply_finetune, holds_nf4, nf4_backend, nf4_bytes
    from costlab.models.gpt import build_model, has_blocks
    from costlab.parallelism.apply import apply_parallelisms, build_mesh, fake_group

    with on_meta():
        model = apply_finetune(build_model(cfg.model), cfg, shards=dims.dp_shard)
    params: dict[int, tuple[str, torch.Tensor]] = {id(p): (n, p) for n, p in model.named_parameters()}
    roots: list[list[torch.Tensor]] = []  # FSDP's all-gather units: each pipeline stage's root, and its blocks
    blocks: list[list[torch.Tensor]] = []
    parts = [model]  # the model, or this rank's pipeline stages, as this rank lays them out
    if world > 1:  # sharded: lay the model out as this rank will
        params = {}
        with fake_group(rank, world):
            mesh = build_mesh(dims, "cpu")
            parts = _stage_parts(model, cfg, dims, mesh)
            for part in parts:
                apply_parallelisms(part, cfg, dims, mesh, torch.device("meta"))
                inner = [list(b.parameters()) for b in part.blocks.values()] if has_blocks(part) else []
                inside = {id(p) for block in inner for p in block}
                blocks += inner
                roots.append([p for p in {id(p): p for p in part.parameters()}.values() if id(p) not in inside])
                params.update({id(p): (n, p) for n, p in part.named_parameters()})
    tied = {i for part in parts for i in _shared(part)}  # the weights a stage uses twice

    # finetune=qlora: the adapted Linears' frozen weights are held in NF4 (built here in full precision, on meta)
    backend = nf4_backend(cfg) if holds_nf4(cfg) else None

    def held(name: str, p: torch.Tensor) -> int:
        nf4 = nf4_bytes(p.numel(), backend, dims.dp_shard) if backend and name.endswith("base_layer.weight") else None
        return _local(p).numel() * _local(p).element_size() if nf4 is None else nf4

    trained = [_local(p) for _, p in params.values() if p.requires_grad]
    optimizer = optimizer_option(cfg)
    state = {
        f"{PREDICTED}params_bytes_per_rank": sum(held(n, p) for n, p in params.values()),
        f"{PREDICTED}grads_bytes_per_rank": sum(_local(p).numel() * p.element_size()
                                                for _, p in params.values() if p.requires_grad),
        f"{PREDICTED}optimizer_bytes_per_rank": sum(optimizer.state_bytes(t.numel()) for t in trained),
    }
    # the output layer's weight where it trains (a stage's head; frozen under LoRA), as this rank holds it
    heads = [part.lm_head.weight for part in parts if getattr(part, "lm_head", None) is not None]
    heads = [h for h in heads if h.requires_grad]
    state.update({f"{HEAD}numel": sum(_local(h).numel() for h in heads),
                  f"{HEAD}grad": sum(_local(h).numel() * _local(h).element_size() for h in heads),
                  f"{HEAD}tied": sum(_local(h).numel() * _local(h).element_size() for h in heads if id(h) in tied)})
    if dims.fsdp_enabled and world > 1:
        fsdp = _fsdp_parts(cfg, dims, roots, blocks, lambda p: held(params[id(p)][0], p), tied)
        state.update({f"{FSDP}{k}": v for k, v in fsdp.items()})
    return state


def _shared(module: Any) -> dict[int, list[str]]:
    """The parameters ``module`` uses more than once (a tied embedding and head): their ids and names."""
    uses: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(name)
    return {i: names for i, names in uses.items() if len(names) > 1}


def _local(p: Any) -> Any:
    """A DTensor's shard on this rank; any other tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


# :func:`_fsdp_parts`, combined by :func:`gathered_bytes`
FSDP_PARTS = ("root", "root_grads", "root_reduce", "root_tied", "block", "blocks", "block_grads", "block_reduce")


def _fsdp_parts(cfg: DictConfig, dims: Any, roots: list[list[Any]], blocks: list[list[Any]], held: Any,
                tied: set[int]) -> dict[str, float]:
    """FSDP's unsharded parameters and gradients (FSDP2 as :func:`costlab.parallelism.fsdp.apply_fsdp` applies it
    to a model or to each pipeline stage), each unit gathered over its ``dp_shard`` ranks in the mixed-precision
    policy's dtype (the autocast dtype; the parameters' own without one; a QLoRA base weight's NF4 bytes),
    ``held(p)`` being the bytes of ``p``'s local shard, ``tied`` the weights a stage uses twice:

        root          the roots' parameters (embeddings, final norm, head): FSDP2 does not reshard a root after
                      forward, so they stay gathered to the end of backward
        root_grads    their gradients (the head's from early in backward), unsharded until the root's reduce-scatter
        root_reduce   their reduce-scatter input at the end of backward (an fp32 copy of them: the reduce dtype)
        root_tied     a tied weight's two transients then: the embedding's dense gradient and its sum with the head's
        block         the largest block's parameters, gathered
        blocks        every block's (a rank's blocks are ``blocks / block``)
        block_grads   the largest block's unsharded gradients
        block_reduce  and its reduce-scatter input

    Each is the same at any depth but ``blocks``, which grows with it (:func:`predict_layout_state` extrapolates
    from one and two layers a stage)."""
    mp = _autocast_bytes(cfg) if _autocast_bytes(cfg) < FP32 else None

    def numel(p: Any) -> int:  # unsharded over the FSDP ranks (what tensor parallel leaves this rank)
        return dims.dp_shard * _local(p).numel()

    def gathered(p: Any) -> float:
        shard = _local(p)
        nf4 = held(p) != shard.numel() * shard.element_size()  # a QLoRA base weight, gathered as its NF4 codes
        return dims.dp_shard * held(p) if nf4 else numel(p) * (mp or shard.element_size())

    def grads(unit: list[Any], dtype_bytes: int | None = None) -> float:
        return sum(numel(p) * (dtype_bytes or mp or p.element_size()) for p in unit if p.requires_grad)

    gathered_blocks = [sum(gathered(p) for p in b) for b in blocks]
    everything = [p for r in roots for p in r]
    return {
        "root": sum(gathered(p) for p in everything),
        "root_grads": grads(everything),
        "root_reduce": grads(everything, FP32),
        "root_tied": 2 * grads([p for p in everything if id(p) in tied]),
        "block": max(gathered_blocks, default=0.0),
        "blocks": sum(gathered_blocks),
        "block_grads": max((grads(b) for b in blocks), default=0.0),
        "block_reduce": max((grads(b, FP32) for b in blocks), default=0.0),
    }


def _gloo(cfg: DictConfig) -> bool:
    """Whether ``cfg`` runs its collectives on gloo (on CPU), whose reductions work on a copy of their input: a
    plan's hardware option says, a run's device."""
    device = cfg.trainer.get("device", "auto")
    if cfg.get("mode") == "plan" or device == "auto":
        return (cfg.get("hardware") or {}).get("name") == "cpu"
    return device == "cpu"


def gathered_bytes(cfg: DictConfig, parts: dict[str, float], grads: float, activations: float,
                   loss_backward: float, shards: int) -> float:
    """What FSDP's unsharded parameters and gradients (:func:`_fsdp_parts`) add to a rank's peak over the other
    parts' sum (``grads`` + ``activations`` + ``loss_backward``, each at its most), at the largest of the moments of
    backward, as FSDP2 orders them:

        the loss's backward   the other parts at their most, and the roots' gathered parameters
        the k-th block's      the roots' parameters and gradients; the activations less the k - 1 blocks' behind it
        backward              (a rank's activations taken as its blocks' alone) and those blocks' sharded gradients
                              (a ``shards``-th of their reduce-scatter inputs); and, while it computes its gradients,
                              it and the block prefetched before it gathered (with
                              ``parallelism.reshard_after_forward=false``, every block not yet through backward), its
                              unsharded gradients and the reduce-scatter input of the block before it (FSDP2 frees one
                              when it makes the next); at its reduce-scatter, itself resharded, its gradients and
                              their reduce-scatter input
        the roots' gradients  the gradients, the roots' parameters and gradients, and a tied weight's transients; then,
                              the roots resharded, their gradients and their reduce-scatter input

    On CPU, gloo's reduce-scatter holds a working copy of its input until the next collective (NCCL's reduces in
    place): each reduce-scatter's input counts twice."""
    reduce = 2 if _gloo(cfg) else 1
    count = round(parts["blocks"] / parts["block"]) if parts["block"] else 0
    reshard = cfg.parallelism.get("reshard_after_forward", True)
    block, grads_b, input_b = parts["block"], parts["block_grads"], parts["block_reduce"]
    moments = [parts["root"] + activations + loss_backward + grads]
    for k in range(count):
        held = parts["root"] + parts["root_grads"] + activations * (count - k) / count + k * input_b / shards
        gathered = block * (min(2, count - k) if reshard else count - k)
        moments += [held + gathered + grads_b + (input_b if k else 0.0),
                    held + gathered - block + grads_b + reduce * input_b + input_b / shards]
    moments += [grads + parts["root"] + parts["root_grads"] + parts["root_tied"],
                grads + parts["root_grads"] + reduce * parts["root_reduce"]]
    return max(max(moments) - (grads + activations + loss_backward), parts["root"])


def optimizer_option(cfg: DictConfig) -> Any:
    """The run's ``optimizer`` option (its schema, :mod:`costlab.schema`), which says how many bytes of state it
    keeps per parameter; AdamW for a config written before the group existed."""
    from costlab.schema import group_node, option

    return option("optimizer", group_node(cfg, "optimizer"))


def predict_state(cfg: DictConfig, world: int) -> dict[str, float]:
    """Predicted per-rank state bytes (largest over ranks) of ``cfg`` at ``world`` ranks, and its activations. Must
    run in a process with no process group yet (the launcher, a plan, or a worker before it joins its group)."""
    return with_step_parts(cfg, world, predict_layout_state(cfg, world))


def with_step_parts(cfg: DictConfig, world: int, layout: dict[str, float]) -> dict[str, float]:
    """The per-rank parts of the peak: ``layout``'s state bytes (:func:`predict_layout_state`), then what the
    training step adds: the activations, checkpointing's recompute, the loss's backward and FSDP's gathered
    parameters and gradients (from ``layout``'s FSDP parts, which are not kept)."""
    from costlab.parallelism.dims import parallel_dims

    out = {k: v for k, v in layout.items() if not k.startswith((FSDP, HEAD))}
    head = {k[len(HEAD):]: v for k, v in layout.items() if k.startswith(HEAD)}
    held, rebuilt = activation_parts(cfg, world)
    out[f"{PREDICTED}activations_bytes_per_rank"] = held  # beside the measured mem/activations_bytes_per_rank
    if rebuilt:
        out[RECOMPUTE] = rebuilt
    grads = out[f"{PREDICTED}grads_bytes_per_rank"]
    out[LOSS_BACKWARD] = loss_backward_bytes(cfg, world, grads, held, head)
    tied = tied_gradient_bytes(cfg, world, head, held + rebuilt + out[LOSS_BACKWARD])
    if tied:
        out[TIED_GRADIENT] = tied
    if f"{FSDP}root" in layout:
        parts = {k: layout[f"{FSDP}{k}"] for k in FSDP_PARTS}
        out[GATHERED] = gathered_bytes(cfg, parts, grads, held + rebuilt, out[LOSS_BACKWARD],
                                      parallel_dims(cfg.parallelism, world).dp_shard)
    overlap = backward_overlap_bytes(cfg, world, head, grads, held, rebuilt, out[LOSS_BACKWARD] + tied)
    if overlap:
        out[BACKWARD_OVERLAP] = overlap
    backward = grads + held + sum(out.get(k, 0.0) for k in (RECOMPUTE, LOSS_BACKWARD, TIED_GRADIENT, GATHERED,
                                                             BACKWARD_OVERLAP))
    step = optimizer_step_bytes(cfg, grads, backward)
    if step:
        out[OPTIMIZER_STEP] = step
    return out


def optimizer_step_bytes(cfg: DictConfig, grads: float, backward: float) -> float:
    """What the optimizer's step adds to a rank's peak over ``backward``, the gradients, activations and transients
    at backward's largest moment (beyond the parameters and optimizer state): the step holds every gradient and, in
    PyTorch's foreach implementation (its default on a GPU), a temporary of one fp32 value per trained parameter
    (AdamW's square root of ``exp_avg_sq``, SGD's decayed gradients), as large as the gradients. It adds something
    where backward's activations are smaller than the gradients (a large model's small micro-batch, full
    checkpointing). On CPU PyTorch runs its for-loop implementation, one tensor's temporary at a time, and torchao's
    optimizers update tensor by tensor: not counted (a CPU run's allocator peak is read over forward and backward)."""
    if _gloo(cfg) or not optimizer_option(cfg).foreach_step:
        return 0.0
    return max(0.0, 2 * grads - backward)


def backward_overlap_bytes(cfg: DictConfig, world: int, head: dict[str, float], grads: float, held: float,
                           rebuilt: float, transients: float) -> float:
    """What a step whose gradients are freed between steps holds less than the sum of its parts (``grads``, the
    activations ``held`` when backward starts, checkpointing's ``rebuilt`` block and the loss's, the head's and a
    tied weight's ``transients``), at most 0: backward makes each layer's gradients as it frees that layer's
    activations, so the two are never held whole at once. The peak is the largest of three moments:

        the loss's and the head's   every activation; the loss's two fp32 tokens x vocabulary tensors, or the head's
        backward                    gradient and its autocast copies (:func:`_head_backward`); no other gradient
        a block's backward          the activations not yet freed and the gradients made so far: at most the larger
                                    of the two whole and a layer's share of the other, with checkpointing's block
        the end of backward         every gradient, and a tied weight's three (:func:`tied_gradient_bytes`)

    Only where the gradients are freed (:func:`_grads_freed`: not under accumulation or DDP, whose gradients are
    held through backward), and not under FSDP (:func:`gathered_bytes` orders its own moments) or a pipeline (a
    stage's gradients are made at its first micro-batch's backward and held through its others)."""
    from costlab.parallelism.dims import parallel_dims

    dims = parallel_dims(cfg.parallelism, world)
    if not _grads_freed(cfg, dims) or dims.fsdp_enabled or dims.pp_enabled:
        return 0.0
    tokens = _micro_tokens(cfg, dims)
    m = _shapes(cfg)
    layers = max(1, int(getattr(m, "n_layer", 0) or 0))
    start = held + max(2 * FP32 * tokens * _vocab(cfg), head.get("grad", 0.0) + _head_backward(cfg, head, tokens,
                                                                                                 False))
    blocks = max(held, grads) + min(held, grads) / layers + rebuilt
    end = grads + 2 * head.get("tied", 0.0)
    return min(0.0, max(start, blocks, end) - (grads + held + rebuilt + transients))


def predicted_peak(predicted: dict[str, float]) -> float:
    """A rank's predicted peak: the sum of :func:`predict_state`'s parts in ``predicted`` (the figures derived from
    them left out)."""
    return sum(v for k, v in predicted.items() if k.startswith(PREDICTED) and k not in (STEP_ALLOCATED,
                                                                                         PREDICTED_OVER_MEASURED))


def step_allocated_bytes(cfg: DictConfig, world: int, predicted: dict[str, float]) -> float:
    """What a training step adds to the bytes its rank holds as it begins (the predicted peak less the parameters
    and optimizer state; less the gradients too under DDP, whose all-reduce buckets hold them for the run), the
    counterpart of a warm-up step's measured allocator peak on CPU (:mod:`costlab.measure.allocator`): its second,
    which begins with the optimizer's state made, or its first, which begins without it and does not make it."""
    from costlab.parallelism.dims import parallel_dims

    ddp = parallel_dims(cfg.parallelism, world).ddp_enabled
    held = [f"{PREDICTED}params_bytes_per_rank", f"{PREDICTED}optimizer_bytes_per_rank",
            *([f"{PREDICTED}grads_bytes_per_rank"] if ddp else [])]
    return predicted_peak(predicted) - sum(predicted[k] for k in held)


def loss_backward_bytes(cfg: DictConfig, world: int, grads: float, held: float,
                        head: dict[str, float] | None = None) -> float:
    """What the loss's and the output layer's backward add to a rank's peak, the larger of two moments:

        the loss's      the gradient of the fp32 log-softmax's output and that of its input, two fp32 tokens x
                        vocabulary tensors alive at once (the loss upcasts the logits, :func:`costlab.models.loss.
                        loss_fn`; tensor parallel gathers them whole), less ``grads``, the rank's gradient bytes,
                        which the trainer has set to None since the last step and which are not allocated yet then
                        (unless a step accumulates micro-batches or a pipeline's, or DDP holds them: its gradients
                        are views into its all-reduce buckets, allocated for the run)
        the head's      its weight's gradient (``head``: :func:`_rank_state`'s ``head/`` parts), made beside the
                        gradient it is added to where that is held (as above), and under autocast first in the
                        autocast dtype (the gradient of the weight's cast copy); the logits' gradient, in the
                        autocast dtype, in place of the log-softmax's output

    Under a pipeline it falls on the last stage: what it adds to the largest stage's peak, over ``held``,
    :func:`activation_parts`' held bytes. On one H200 the loss's moment is GPT-2 small's whole gap to
    ``max_memory_allocated``; the head's outweighs it where the model is wider than twice a micro-batch's tokens
    and the gradients are held (a pipeline's last stage, DDP). FSDP's head is gathered, its gradient unsharded and
    reduced in its own buffers (:func:`gathered_bytes`)."""
    from costlab.parallelism.dims import parallel_dims

    dims = parallel_dims(cfg.parallelism, world)
    if dims.pp_enabled:
        return max(0.0, activation_parts(cfg, world, head=head or {})[0] - held)
    tokens, freed = _micro_tokens(cfg, dims), _grads_freed(cfg, dims)
    return max(0.0, tokens * 2 * FP32 * _vocab(cfg) - (grads if freed else 0.0),
               0.0 if dims.fsdp_enabled else _head_backward(cfg, head or {}, tokens, not freed))


def first_rank_rows(rows: int, tp: int) -> int:
    """The rows the first of ``tp`` ranks holds of ``rows`` split by DTensor (the remainder on the first ranks)."""
    return -(-rows // tp)


def _micro_tokens(cfg: DictConfig, dims: Any) -> float:
    """The tokens of one of a rank's micro-batches (a pipeline's are its ``microbatches``-th of these)."""
    t = cfg.trainer
    return t.batch_size / dims.dp / t.grad_accum_steps * cfg.model.block_size


def _window(cfg: DictConfig) -> float:
    """Bytes per token of one of a rank's micro-batches (:func:`_micro_tokens`; a pipeline's: times its
    ``microbatches``) of the window of token ids the trainer cuts them from: one storage of ``block_size + 1``
    ids a row for the rank's whole batch, which the ids and the targets of every micro-batch are views of, held
    for the step."""
    t = cfg.trainer
    return INDEX * t.grad_accum_steps * (cfg.model.block_size + 1) / cfg.model.block_size


def _grads_freed(cfg: DictConfig, dims: Any) -> bool:
    """Whether a rank's gradients are not allocated when its backward starts: the trainer sets them to None after
    each step, but a step that accumulates micro-batches holds them from its first, and DDP's are views into its
    all-reduce buckets, held for the run (:meth:`costlab.parallelism.ddp.DataParallel.gradients_to_none`)."""
    return int(cfg.trainer.grad_accum_steps) == 1 and not dims.ddp_enabled


def _shapes(cfg: DictConfig) -> Any:
    """The model's shapes (``n_layer``, ``n_embd``, ``vocab_size``...): a Hugging Face model's read from its config."""
    from costlab.measure.traced import hf_shapes

    return hf_shapes(cfg) if is_hf(cfg) else cfg.model


def _vocab(cfg: DictConfig) -> int:
    return int(_shapes(cfg).vocab_size)


def _head_backward(cfg: DictConfig, head: dict[str, float], tokens: float, grad_held: bool) -> float:
    """The head's moment of :func:`loss_backward_bytes` for ``tokens`` tokens, over the activations held."""
    if not head.get("numel"):
        return 0.0
    a = _autocast_bytes(cfg)
    cast = (a * head["numel"] + (a - FP32) * tokens * _vocab(cfg)) if a < FP32 else 0.0
    return cast + (head["grad"] if grad_held else 0.0)


def tied_gradient_bytes(cfg: DictConfig, world: int, head: dict[str, float], others: float) -> float:
    """What a weight the embedding and the head share adds to a rank's peak at the end of backward, beyond
    ``others`` (the activations, recompute and the loss's backward; the gradients are in both): the head's
    gradient waits in autograd's input buffer for the embedding's (the weight's gradient is their sum), so the
    embedding's dense gradient and the sum are made beside it, three of the weight's gradients, beside the others'
    gradients held (the weight's own too where it is held: under DDP, accumulation) and next to no activations.
    Not under FSDP (:func:`gathered_bytes` has it) or a pipeline (whose first and last stages each hold a copy)."""
    from costlab.parallelism.dims import parallel_dims

    dims = parallel_dims(cfg.parallelism, world)
    if not head.get("tied") or dims.fsdp_enabled or dims.pp_enabled:
        return 0.0
    return max(0.0, (2 if _grads_freed(cfg, dims) else 3) * head["tied"] - others)


DEPTH_SHORTCUT = 2  # layers per pipeline stage above which a layout is read at one and two, and extrapolated


def predict_layout_state(cfg: DictConfig, world: int) -> dict[str, float]:
    """The parameter, gradient and optimizer bytes per rank (largest over ranks) of ``cfg`` laid out on ``world``
    ranks (:func:`predict_state` without the activations). A deep model is laid out with one and with two layers per
    pipeline stage and the difference (one layer's shards) scaled to its depth: every layer is laid out alike, so
    this is exact, and an 80-layer model's many layouts cost a plan search seconds, not minutes."""
    from costlab.parallelism.dims import parallel_dims

    dims = parallel_dims(cfg.parallelism, world)
    p = cfg.parallelism
    stages = dims.pp * (int(p.stages_per_rank) if dims.pp_enabled and p.get("schedule") == "interleaved_1f1b" else 1)
    layers = _depth(cfg)
    if layers and layers % stages == 0 and layers // stages > DEPTH_SHORTCUT:
        one, two = (_layout_state(_with_depth(cfg, k * stages), dims, world) for k in (1, 2))
        return {key: one[key] + (layers // stages - 1) * (two[key] - one[key]) for key in one}
    return _layout_state(cfg, dims, world)


def _depth(cfg: DictConfig) -> int | None:
    if is_hf(cfg):
        from costlab.measure.traced import hf_shapes

        return int(hf_shapes(cfg).n_layer)
    return int(cfg.model.n_layer) if "n_layer" in cfg.model else None


def _with_depth(cfg: DictConfig, layers: int) -> DictConfig:
    """``cfg`` with a model of ``layers`` layers (a Hugging Face model's through a config file written for it)."""
    from omegaconf import OmegaConf, open_dict

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(out):
        if is_hf(cfg):
            from costlab.measure.traced import hf_source

            out.model.config, out.model.pretrained = _shallow_config(hf_source(cfg), layers), None
        else:
            out.model.n_layer = layers
    return out


@functools.lru_cache(maxsize=32)
def _shallow_config(source: str, layers: int) -> str:
    """A config file of ``source``'s architecture with ``layers`` layers, in a folder removed at exit."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from costlab.measure.traced import _config, _quiet

    folder = tempfile.mkdtemp(prefix="costlab-depth-")
    atexit.register(shutil.rmtree, folder, True)
    with _quiet():
        _config(source, layers).save_pretrained(folder)
    return str(Path(folder) / "config.json")


def _layout_state(cfg: DictConfig, dims: Any, world: int) -> dict[str, float]:
    sharded = world > 1 and (dims.pp_enabled or dims.fsdp_enabled or dims.tp_enabled)
    # replicas (single, ddp) all hold the whole model; shards are split with the remainder first, so rank 0
    # of each pipeline stage (pp is the outermost mesh dimension) holds the largest. Every pipeline rank but the
    # first (the embedding) and the last (the head) holds as many layers alike (pp.stage_module cuts them evenly):
    # the second stands for them all
    ranks = [stage * (world // dims.pp) for stage in sorted({0, min(1, dims.pp - 1), dims.pp - 1})] if sharded else [0]
    out: dict[str, float] = {}
    for rank in ranks:
        for key, value in _rank_state(cfg, dims, rank, world if sharded else 1).items():
            out[key] = max(out.get(key, 0), value)
    return out


FP32 = 4  # bytes: the residual stream, norm inputs, statistics and the loss's log-softmax stay fp32 under autocast
INDEX = 8  # bytes of an int64 token id or target
LOSS_SCALARS = 3 * FP32  # a micro-batch's loss, the total weight its cross-entropy saves, and backward's seed


def _autocast_bytes(cfg: DictConfig) -> int:
    return 2 if cfg.precision.get("autocast_dtype") in ("bfloat16", "float16") else FP32


def _residual_bytes(cfg: DictConfig, fsdp: bool) -> int:
    """Bytes of one value of the residual stream between blocks: fp32, except where FSDP's mixed precision holds
    the weights in the autocast dtype and casts the inputs to it (then the whole stream is in that dtype)."""
    return _autocast_bytes(cfg) if fsdp else FP32


def _block_terms(cfg: DictConfig, tp: int = 1, residual: int = FP32) -> dict[str, float]:
    """Bytes per token that one transformer block holds for backward: ``none`` (everything autograd
    saves), ``full`` and ``selective`` (what checkpointing keeps), and the ``recompute`` transient of
    each mode (one block's activations rebuilt at a time in backward). See :func:`predict_activations`."""
    m = _gpt_config(cfg)
    a = _autocast_bytes(cfg)
    c, h, heads = m.n_embd, m.hidden_dim / tp, m.n_head / tp
    rms = m.norm == "rmsnorm"
    # a norm saves its fp32 input (and rmsnorm its normalised fp32 product) and statistics; each Linear it
    # feeds saves the norm's output in the autocast dtype: under autocast one cast copy per Linear (q, k, v;
    # c_fc and swiglu's c_fc2), in fp32 the one tensor they share
    norm = FP32 * c * (2 if rms else 1) + FP32 * (1 if rms else 2)
    casts = a < FP32
    norm_out = a * c * ((3 if casts else 1) + (2 if casts and m.mlp == "swiglu" else 1))
    # q, k, v and the attention output (also c_proj's input, unless rotary positions left it in head-major
    # layout: then the reshape copies it) + the attention's fp32 log-sum-exp per head
    attn = a * (c / tp) * (5 if m.pos == "rope" else 4) + FP32 * heads
    mlp = a * h * (4 if m.mlp == "swiglu" else 2)  # gelu: c_fc's output and gelu's; swiglu: both fc, silu, product
    none = 2 * norm + norm_out + attn + mlp
    # selective keeps every matmul's and the attention's output: q, k, v, attention, both c_proj, c_fc (x2 swiglu)
    kept = a * (4 * c / tp + 2 * c + h * (2 if m.mlp == "swiglu" else 1)) + FP32 * heads
    return {"none": none, "full": residual * c, "selective": residual * c + kept,
            "full_recompute": none, "selective_recompute": max(0.0, none - kept)}


def predict_activations(cfg: DictConfig, world: int) -> float:
    """Peak activation bytes of one rank's training step (largest over ranks), from the config alone.

    Per token of a micro-batch (``b`` sequences of ``T = model.block_size`` tokens; ``b`` = batch_size /
    data-parallel ranks / grad_accum_steps, / pipeline micro-batches), with ``a`` the autocast dtype's bytes
    (fp32 4, bf16/fp16 2), ``C`` = n_embd, ``H`` = the MLP width, ``V`` = vocab_size, tensor-parallel
    shards dividing the heads and ``H``:

        block (none)   = 2 norms x (4C [+4C rmsnorm] + stats) + aC x (2 | 5 under autocast [+1 swiglu])
                         + a(4C [+C rope]) + 4 heads + aH (2 | 4 swiglu)
        block (full)   = 4C (the block's input; the block is rebuilt in backward, one at a time)
        block (select) = 4C + a(6C + H [x2 swiglu]) + 4 heads   (matmul and attention outputs kept)
        outside        = final norm (4C [+4C rmsnorm] + aC + stats) + 4V + 8   (the loss's fp32 log-softmax and its
                         copy of the targets; the trainer frees the logits before backward, nothing saves them; a
                         pipeline's schedule keeps them: + aV)

        activations = tokens x (layers x block + outside + window) + 8T (learned positions) + 12 (the loss, its
                      total weight, backward's seed) + under autocast, a rotary block's table copies (4 x aT x D/2
                      a layer: its queries and keys each cast the cosines and sines; rebuilt, not kept, when
                      checkpointed) + tokens x one block (none, full) or its pointwise part (selective), rebuilt in
                      backward under checkpointing
                      + a x Linear weights under autocast (its cast copies: every layer's without
                      checkpointing or on a pipeline, whose schedule's step keeps autocast's cache, else the
                      head's and the rebuilt block's; none under FSDP, which gathers weights in the autocast dtype)

    ``window``: the batch's token ids, one storage of ``T + 1`` a row that the ids and the targets are views of
    (:func:`_window`). On a tiny GPT on CPU this is the bytes a real step holds when backward starts, to the byte,
    for every mode, norm, position, MLP and precision option (tests/test_resources.py measures it).
    Pipeline ranks hold their stages' layers for every chunk in flight (:func:`in_flight`: gpipe all
    micro-batches; 1F1B up to pp_degree on the first stage; interleaved 1F1B more, each of fewer layers), the
    outputs they sent, the logits on the last stage, and the schedule's receive buffers (:func:`_stage_held`).
    Dropout masks are not counted (the configs train without dropout). A Hugging Face model's per-layer and
    outside terms are traced from its own code on fake tensors instead (:mod:`costlab.measure.traced`).
    ``model=mlp`` has no blocks: its window copy, hidden layer twice, output and the loss's log-softmax.
    """
    held, rebuilt = activation_parts(cfg, world)
    return held + rebuilt


def activation_parts(cfg: DictConfig, world: int, head: dict[str, float] | None = None) -> tuple[float, float]:
    """:func:`predict_activations` in two parts: the bytes held when backward starts, and the transient of
    activation checkpointing (one block rebuilt at a time in backward, with its weights' autocast copies).
    ``head`` (the layout's ``head/`` parts): a pipeline's last stage also holds the loss's and the head's backward
    (:func:`loss_backward_bytes`)."""
    from costlab.parallelism.dims import parallel_dims

    t, m, p = cfg.trainer, cfg.model, cfg.parallelism
    dims = parallel_dims(p, world)
    a = _autocast_bytes(cfg)
    copies = a < FP32 and not dims.fsdp_enabled  # FSDP's mixed precision gathers weights in the autocast dtype
    tokens = _micro_tokens(cfg, dims)
    if is_hf(cfg) or uses_adapters(cfg) or (dims.fsdp_enabled and _autocast_bytes(cfg) < FP32 and "n_layer" in m):
        return _traced_parts(cfg, dims, tokens, head)
    if "n_layer" not in m:  # model=mlp: c_fc's input window, c_fc's output and gelu's, c_proj's output
        per_token = a * (m.context * m.n_embd + 2 * m.hidden + m.n_embd) + FP32 * m.vocab_size + 2 * INDEX
        weights = (m.context * m.n_embd + m.n_embd) * m.hidden + m.n_embd * m.vocab_size
        return tokens * per_token + (a * weights if copies else 0.0), 0.0
    mode = t.get("activation_checkpointing", "none")
    terms = _block_terms(cfg, dims.tp, _residual_bytes(cfg, dims.fsdp_enabled))
    rms = m.get("norm", "layernorm") == "rmsnorm"
    block, rebuilt = terms[mode], terms.get(f"{mode}_recompute", 0.0)
    layers = m.n_layer / dims.pp
    if dims.pp_enabled:
        tokens /= int(p.microbatches)
    # the final norm (its fp32 input, rmsnorm's normalised product, its output, its statistics), the loss's fp32
    # log-softmax and its copy of the targets
    outside = FP32 * m.n_embd * (2 if rms else 1) + a * m.n_embd + FP32 * (1 if rms else 2)
    outside += FP32 * m.vocab_size + _targets_copy(cfg, tokens)
    rope = _rope_copies(cfg) / tokens  # per token of a micro-batch: made in every block's forward
    block, rebuilt = block + (rope if mode == "none" else 0.0), rebuilt + (rope if mode != "none" else 0.0)
    if dims.pp_enabled:
        last = _last_stage_backward(cfg, dims, head, tokens) / tokens
        outside += _kept_logits(cfg, m.vocab_size)
        positions = INDEX * m.block_size / tokens if m.get("pos", "learned") == "learned" else 0.0  # looked up
        # a later stage's first block saves its input, the receive buffer its stage holds: counted there
        later = -_residual_bytes(cfg, dims.fsdp_enabled) * m.n_embd
        per_token = max(_stage_held(cfg, m, dims.pp, r, block, outside, dims.fsdp_enabled, tokens=tokens,
                                    first=positions, later=later) + last * (r == dims.pp - 1) for r in range(dims.pp))
    else:  # + the batch's window, the positions a learned table looks up, and the loss's scalars
        positions = INDEX * m.block_size if m.get("pos", "learned") == "learned" else 0.0
        per_token = layers * block + outside + _window(cfg) + (positions + LOSS_SCALARS) / tokens
    held, rebuilt = tokens * per_token, tokens * rebuilt
    if copies:
        hidden = _gpt_config(cfg).hidden_dim
        block_w = (4 * m.n_embd + (3 if m.get("mlp") == "swiglu" else 2) * hidden) * m.n_embd / dims.tp
        held += a * first_rank_rows(m.vocab_size, dims.tp) * m.n_embd  # lm_head: the first rank's rows, the most
        if mode == "none" or _casts_cached(dims):
            held += a * layers * block_w
        else:  # cast again when the block is rebuilt; not kept
            rebuilt += a * block_w
    return held, rebuilt


def _targets_copy(cfg: DictConfig, tokens: float) -> float:
    """Bytes per token of the loss's copy of a micro-batch's targets of ``tokens`` tokens: a view of the batch's
    window that skips each row's first id, which the loss's flatten copies; one row's view is contiguous, and not
    copied."""
    return INDEX if tokens > cfg.model.block_size else 0.0


def _rope_copies(cfg: DictConfig) -> float:
    """Bytes of the rotary tables' copies one of costlab's Llama-style blocks makes in a forward under autocast
    (none outside it, or under FSDP, which casts the fp32 tables once as a block's inputs: traced): its queries
    and its keys each cast the cosines and the sines (``block_size`` x head_dim / 2) to their dtype, which their
    products save."""
    m = cfg.model
    a = _autocast_bytes(cfg)
    if m.get("pos", "learned") != "rope" or a == FP32:
        return 0.0
    return 2 * 2 * a * m.block_size * _gpt_config(cfg).head_dim / 2


def _casts_cached(dims: Any) -> bool:
    """Whether every block's autocast copies of its weights stay held under activation checkpointing too: on a
    pipeline, whose schedule runs each micro-batch's backward inside the step that runs the forwards
    (:meth:`costlab.parallelism.pp.PipelineParallel.forward_backward`, as torchtitan's trainer wraps its schedule's
    step in autocast), and autocast's cache keeps each weight's cast copy until that step's autocast exits: cast
    once for every micro-batch, and found there when a checkpointed block is rebuilt (no copy made again then).
    Elsewhere the forward's autocast exits before backward, and a rebuilt block casts its weights again."""
    return bool(dims.pp_enabled)


def _kept_logits(cfg: DictConfig, vocab: int) -> float:
    """Bytes per token of the logits a pipeline keeps for its loss (its schedule holds a stage's output until the
    stage's backward; the trainer frees its own before backward, as nothing saves them), in the head's output dtype."""
    return _autocast_bytes(cfg) * vocab


def in_flight(schedule: str, microbatches: int, pp: int, pp_rank: int, stages_per_rank: int = 1) -> int:
    """Forward chunks (one micro-batch through one of the rank's stages) whose activations pipeline rank
    ``pp_rank`` holds when its first backward starts, as PyTorch's schedules order them (gpipe: every
    micro-batch; 1F1B: ``pp - pp_rank``, at most all of them; interleaved 1F1B: its warm-up forwards and the one
    before its first backward, :func:`interleaved_order`)."""
    if schedule == "gpipe":
        return microbatches
    if schedule == "interleaved_1f1b":
        order = interleaved_order(microbatches, pp, pp_rank, stages_per_rank)
        return [kind for kind, _ in order].index("B")
    return min(microbatches, pp - pp_rank)


def interleaved_order(microbatches: int, pp: int, pp_rank: int, stages_per_rank: int) -> list[tuple[str, int]]:
    """The computations pipeline rank ``pp_rank`` runs under interleaved 1F1B, in order: ("F" forward or "B"
    backward, stage index) of one micro-batch each, as PyTorch's ``ScheduleInterleaved1F1B`` lays them out
    (``_get_1f1b_rank_ops``): ``(v - 1) r + 2 (pp - 1 - pp_rank)`` warm-up forwards, ``r`` the micro-batches of one
    of its ``microbatches // pp`` rounds (at most every chunk), then a forward and a backward in turn, then the
    backwards left; forwards go through the rank's stages a round at a time, first to last, backwards last to
    first."""
    v, total = stages_per_rank, microbatches * stages_per_rank
    per_round = microbatches // max(1, microbatches // pp)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - pp_rank), total)

    def forward(op: int) -> tuple[str, int]:
        return "F", (op // per_round) % v * pp + pp_rank

    def backward(op: int) -> tuple[str, int]:
        return "B", (v - 1 - (op - warmup) // per_round % v) * pp + pp_rank

    steady = [action for op in range(warmup, total) for action in (forward(op), backward(op))]
    return [*map(forward, range(warmup)), *steady, *map(backward, range(total, total + warmup))]


def _moments(schedule: str, microbatches: int, pp: int, pp_rank: int, stages_per_rank: int
             ) -> list[tuple[dict[int, int], int]]:
    """The moments a backward starts that can be pipeline rank ``pp_rank``'s peak: the chunks in flight by stage,
    and the tensors of a chunk's output size held beyond theirs. 1F1B's warm-up keeps its last fired send's work,
    and with it that chunk's output, until the step ends (PyTorch's ``Schedule1F1B`` waits on it but holds it):
    one output more on every stage with two warm-up chunks or more once that chunk's backward is done.
    Interleaved 1F1B's runtime keeps every send's work until the step ends, so every output a forward sent stays
    (:func:`interleaved_order`). And in the first step a stage after the first holds one more input until its
    second forward: the one PyTorch's schedule made from the previous stage's shapes to learn its own (its
    metadata inference); counted where a backward comes before that (1F1B's last stage), as a GPU's peak counts
    the first step too."""
    if schedule != "interleaved_1f1b":
        chunks = in_flight(schedule, microbatches, pp, pp_rank)
        kept = int(schedule == "1f1b" and microbatches >= 2 * chunks - 1 >= 3) + int(chunks == 1 and pp_rank > 0)
        return [({pp_rank: chunks}, kept)]
    last = pp * stages_per_rank - 1
    alive: dict[int, int] = {}
    sent, out = 0, []
    for kind, stage in interleaved_order(microbatches, pp, pp_rank, stages_per_rank):
        if kind == "F":
            alive[stage] = alive.get(stage, 0) + 1
            sent += stage != last
        else:
            inference = not out and sum(alive.values()) == 1 and stage > 0  # its one forward so far
            out.append((dict(alive), sent - sum(n for s, n in alive.items() if s != last) + inference))
            alive[stage] -= 1
    return out


def _stage_held(cfg: DictConfig, m: Any, pp: int, pp_rank: int, block: float, outside: float, fsdp: bool,
                block_const: float = 0.0, outside_const: float = 0.0, tokens: float = 1.0, first: float = 0.0,
                later: float = 0.0) -> float:
    """Bytes per token of a micro-batch that pipeline rank ``pp_rank`` holds when its peak backward starts
    (:func:`_moments`): its chunks in flight (each its stage's layers, and the output it sent, kept for backward;
    the last stage's, its logits), the outputs the schedule's sends still hold, and the schedule's receive buffers
    (one per micro-batch and stage: activations into every stage but the first, gradients into every stage but
    the last; in the residual stream's dtype, :func:`_residual_bytes`). ``m``: the model's shapes; ``*_const``:
    bytes per forward (a traced model's autocast copies of weights, held once), over ``tokens`` per micro-batch.

    Beside what autograd saves: every stage's split of the batch (the ids on the first, the targets on the last,
    both on the others, which the trainer hands every stage) holds the whole window of token ids (one storage,
    ``tokens + 1`` a row) for the step. ``first``: bytes per token the first stage holds for each chunk in flight
    before its layers (what its embedding side saves: positions, an embedding dropout's mask, rotary tables);
    ``later``: bytes per token each later stage's chunk holds beside its layers and its receive buffer (a Hugging
    Face decoder's rotary cosines and sines, which every stage computes for its own layers; less the first
    layer's input where that is the receive buffer itself, which ``block`` and the buffers would both count;
    ``outside`` is then the last stage's alone, without the embedding side)."""
    p = cfg.parallelism
    micro = int(p.microbatches)
    v = int(p.stages_per_rank) if p.schedule == "interleaved_1f1b" else 1
    n_stages = pp * v
    stages = range(pp_rank, n_stages, pp)
    residual = _residual_bytes(cfg, fsdp) * m.n_embd
    buffers = sum((s > 0) + (s < n_stages - 1) for s in stages) * micro * residual
    layers = m.n_layer / n_stages
    const = (layers * len(stages) * block_const + (outside_const if n_stages - 1 in stages else 0.0)) / tokens
    window = micro * _window(cfg)

    def chunk(s: int) -> float:
        return layers * block + (later if s else first) + (outside if s == n_stages - 1 else residual)

    held = max(sum(n * chunk(s) for s, n in alive.items()) + kept * residual
               for alive, kept in _moments(p.schedule, micro, pp, pp_rank, v))
    return held + buffers + const + window


def _last_stage_backward(cfg: DictConfig, dims: Any, head: dict[str, float] | None, tokens: float) -> float:
    """What the loss's and the head's backward (:func:`loss_backward_bytes`) add to the last pipeline stage's
    micro-batch of ``tokens`` tokens (nothing without ``head``): its gradients are held from its second
    micro-batch on (under FSDP, its gathered term has the head's)."""
    if head is None:
        return 0.0
    held = int(cfg.parallelism.microbatches) * int(cfg.trainer.grad_accum_steps) > 1
    return max(2 * FP32 * tokens * _vocab(cfg), 0.0 if dims.fsdp_enabled else _head_backward(cfg, head, tokens, held))


def _traced_parts(cfg: DictConfig, dims: Any, tokens: float, head: dict[str, float] | None = None
                  ) -> tuple[float, float]:
    """:func:`activation_parts` from a model's traced terms (:mod:`costlab.measure.traced`): every Hugging Face
    model, and costlab's GPTs under FSDP with autocast (its mixed precision runs the residual stream in the
    autocast dtype, and autocast then casts each norm's input back to fp32: the trace reads what that saves)."""
    from costlab.measure.traced import stage_terms, traced_terms

    m = _shapes(cfg)
    # a pipeline's step runs backward inside autocast, whose cache keeps its copies (the biases' too) till the end
    cached = _casts_cached(dims) and _autocast_bytes(cfg) < FP32
    terms = traced_terms(cfg, dims.tp, dims.fsdp_enabled, cached)
    if dims.pp_enabled:
        tokens /= int(cfg.parallelism.microbatches)
    terms["outside"] -= INDEX - _targets_copy(cfg, tokens)  # traced at two and three rows, which copy them
    a = _autocast_bytes(cfg)
    if dims.tp > 1 and a < FP32 and not dims.fsdp_enabled:  # the head's cast copy is of this rank's shard only
        terms["outside_const"] -= a * (m.vocab_size - first_rank_rows(m.vocab_size, dims.tp)) * m.n_embd
    checkpointed = cfg.trainer.get("activation_checkpointing", "none") != "none"
    rebuilt_tok = max(0.0, terms["none"] - terms["block"]) if checkpointed else 0.0
    rebuilt_const = max(0.0, terms["none_const"] - terms["block_const"]) if checkpointed else 0.0
    if checkpointed and _casts_cached(dims):  # every block's cast copies, held
        terms = {**terms, "block_const": max(terms["block_const"], terms["none_const"])}
        rebuilt_const = 0.0
    if dims.pp_enabled:
        last = _last_stage_backward(cfg, dims, head, tokens) / tokens
        outside = terms["outside"] + _kept_logits(cfg, m.vocab_size)
        # the first stage's embedding side and what a later stage's decoder makes, traced as they run; the last
        # stage holds the rest of the outside
        first_tok, first_const = stage_terms(cfg, dims.tp, dims.fsdp_enabled, "first", cached)
        later_tok, later_const = stage_terms(cfg, dims.tp, dims.fsdp_enabled, "later", cached)
        outside -= first_tok
        per_token = max(_stage_held(cfg, m, dims.pp, r, terms["block"], outside, dims.fsdp_enabled,
                                    terms["block_const"], terms["outside_const"] - first_const, tokens,
                                    first_tok + first_const / tokens, later_tok + later_const / tokens)
                        + last * (r == dims.pp - 1) for r in range(dims.pp))
        return tokens * per_token, tokens * rebuilt_tok + rebuilt_const
    held = tokens * (m.n_layer * terms["block"] + terms["outside"] + _window(cfg))
    return held + m.n_layer * terms["block_const"] + terms["outside_const"], tokens * rebuilt_tok + rebuilt_const


def _gpt_config(cfg: DictConfig) -> Any:
    from costlab.models.gpt import GPTConfig

    return GPTConfig(**{k: v for k, v in cfg.model.items() if k in GPTConfig.__dataclass_fields__})
