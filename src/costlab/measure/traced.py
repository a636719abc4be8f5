"""Activation terms of a model read from its own forward pass run on fake tensors: every Hugging Face model, and
costlab's own GPTs where FSDP's mixed precision decides which dtype each tensor is saved in.

``transformers`` families differ in what their layers save for backward (how a norm upcasts, how rotary
positions are applied, a parallel residual, an MLP's activation), so rather than a formula per family the memory
model runs the model's real code on :class:`torch._subclasses.fake_tensor.FakeTensorMode` tensors: shapes and
dtypes without data, no memory and next to no time, a 70B-parameter layer as cheaply as a tiny one. The bytes
the forward leaves alive for backward are counted as a run counts them
(:class:`costlab.measure.activations.SavedActivations`), for one sequence of ``model.block_size`` tokens:

    per layer = alive(2 layers) - alive(1 layer)        (a layer under the run's checkpointing mode)
    outside   = alive(1 layer) - per layer              (embedding, final norm and the loss; the logits are freed)

each traced at two and at three sequences, which splits it into bytes per token and bytes per forward (autocast's
copies of the weights, which do not grow with the batch),

each under the run's autocast dtype, with the weights in the dtype the run multiplies them in (FSDP's mixed
precision gathers them in the autocast dtype, so autocast copies none), and tensor parallel's shards as the
layer's heads and MLP width divided by its degree.
"""

from __future__ import annotations

import functools
import gc
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from costlab.models.hf_config import is_hf


def traced_terms(cfg: DictConfig, tp: int, fsdp: bool, cached: bool = False) -> dict[str, float]:
    """Bytes per token and per forward (``_const``) of: ``block`` (a layer under
    ``trainer.activation_checkpointing``), ``none`` (a layer without checkpointing: what a checkpointed layer
    rebuilds in backward) and ``outside``. ``cached``: with what autocast's cache keeps (:func:`_alive`)."""
    key = _trace_key(cfg, tp, fsdp)
    mode = cfg.trainer.get("activation_checkpointing", "none")
    out: dict[str, float] = {}
    for name, layer_mode in (("block", mode), ("none", "none")):
        (one_tok, one_const), (two_tok, two_const) = (_split(key, n, layer_mode, cached=cached) for n in (1, 2))
        out[name], out[f"{name}_const"] = two_tok - one_tok, two_const - one_const
        if name == "block":
            out["outside"], out["outside_const"] = one_tok - out[name], one_const - out[f"{name}_const"]
    return out


def stage_terms(cfg: DictConfig, tp: int, fsdp: bool, part: str, cached: bool = False) -> tuple[float, float]:
    """(bytes per token, bytes per forward) a pipeline stage holds for each micro-batch in flight beside its layers
    (as ``block`` counts them) and its output. ``part="first"``: what the decoder's modules before its layers save
    (an embedding dropout's mask and output, positions, rotary tables); traced as that stage runs, the decoder
    alone, one layer, no final norm. Less than nothing where the first layer saves less than a later one: under
    LoRA nothing before it trains, so it keeps no input for a gradient. ``part="later"``: a stage after the first,
    beside its receive buffer too: what its decoder makes for its own layers (rotary tables, which every stage
    computes again), less its first layer's input where that layer saves the receive buffer itself (a norm in the
    buffer's dtype, a checkpointed layer's kept input: ``block`` counts a layer's input, the stage's buffers count
    that one again); traced as that stage runs, the decoder without its embedding side, final norm and head, one
    layer, fed a hidden state made outside the meter. ``cached``: as :func:`traced_terms`."""
    mode = cfg.trainer.get("activation_checkpointing", "none")
    terms = traced_terms(cfg, tp, fsdp, cached)
    tok, const = _split(_trace_key(cfg, tp, fsdp), 1, mode, part, cached)
    return tok - terms["block"], const - terms["block_const"]


def _trace_key(cfg: DictConfig, tp: int, fsdp: bool) -> tuple:
    """What a trace of the run's model depends on (:func:`_alive`'s leading arguments): its architecture, the
    tensor-parallel degree, autocast's dtype and the weights' (FSDP gathers them in autocast's), the sequence, the
    attention and the adapters."""
    m = cfg.model
    autocast = cfg.precision.get("autocast_dtype")
    weights = autocast if fsdp and autocast else "float32"
    attn = str(m.get("attn_implementation", "sdpa"))
    source = hf_source(cfg) if is_hf(cfg) else json.dumps(OmegaConf.to_container(m, resolve=True), sort_keys=True)
    return source, int(tp), str(autocast), weights, int(m.block_size), attn, adapters_key(cfg)


def hf_source(cfg: DictConfig) -> str:
    """The config a ``model=hf`` run's architecture comes from: ``model.config``'s file or ``model.pretrained``."""
    from costlab.models.hf_config import config_file

    m = cfg.model
    return str(config_file(m.config)) if m.get("config") and not m.get("pretrained") else str(m.pretrained)


def hf_shapes(cfg: DictConfig) -> Any:
    """Layers, width, heads and vocabulary of a ``model=hf`` run's model, from its config alone."""
    from costlab.models.hf import gpt_view

    source = hf_source(cfg)
    return gpt_view(_config_dict(source, _stamp(source)), int(cfg.model.block_size))


def hf_config(cfg: DictConfig) -> dict[str, Any]:
    """A ``model=hf`` run's config as ``transformers`` reads it (defaults filled in), as a dict; not to be changed."""
    source = hf_source(cfg)
    return _config_dict(source, _stamp(source))


@functools.lru_cache(maxsize=32)
def _config_dict(source: str, stamp: int) -> dict[str, Any]:
    """``AutoConfig``'s reading of ``source`` as a dict, once per version of its file (``stamp``, :func:`_stamp`):
    a plan search asks for the shapes of every candidate. Read, never changed, by its callers."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).to_dict()


def _stamp(source: str) -> int:
    """When ``source``'s config file last changed (ns), or 0 where it is no file here (a hub id)."""
    from costlab.models.hf_config import config_file

    try:
        return config_file(source).stat().st_mtime_ns
    except OSError:
        return 0


def _split(key: tuple, layers: int, mode: str, part: str = "model", cached: bool = False) -> tuple[float, float]:
    """(bytes per token, bytes per forward) from traces of two and of three sequences (not one: a batch of one
    makes some of a layer's copies free, as a transpose of a size-1 dimension needs none)."""
    two, three = _alive(*key, layers, mode, 2, part, cached), _alive(*key, layers, mode, 3, part, cached)
    per_row = three - two
    return per_row / key[4], two - 2 * per_row


@functools.lru_cache(maxsize=1024)
def _alive(source: str, tp: int, autocast: str, weights: str, tokens: int, attn: str, adapters: str, layers: int,
           mode: str, rows: int, part: str = "model", cached: bool = False) -> float:
    """Bytes alive for backward after the forward and loss of ``rows`` sequences (see the module). ``source``: a
    Hugging Face config file, or a costlab ``model`` node as JSON (``{...}``). ``part="first"``: a pipeline's first
    stage, its forward alone (no final norm, no head, no loss), less its output; ``part="later"``: a stage between
    the first and the last, from a hidden state made before the meter (the receive buffer, counted apart).
    ``cached``: read while autocast is still on (a pipeline's step runs its backward inside autocast), so what
    autocast's cache keeps is counted, the cast copies of the biases among them, which nothing saves."""
    import torch

    dtype = getattr(torch, weights)
    # the meter collects garbage before it reads: only the trace's own objects need scanning, not the process's
    # heap (a plan search traces dozens of times; a full collection is most of a trace's time)
    gc.freeze()
    try:
        return _alive_traced(source, tp, autocast, dtype, tokens, attn, adapters, layers, mode, rows, part, cached)
    finally:
        gc.unfreeze()


def _alive_traced(source: str, tp: int, autocast: str, dtype: Any, tokens: int, attn: str, adapters: str,
                  layers: int, mode: str, rows: int, part: str = "model", cached: bool = False) -> float:
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from costlab.measure.activations import SavedActivations
    from costlab.parallelism.techniques import apply_ac, fsdp_casts_block_inputs

    with FakeTensorMode(), _hf_only(source):
        model, forward = _fake_model(source, tp, layers, dtype, attn, adapters)
        # the ids and the targets as the trainer hands them over: views of one window of ``tokens + 1`` a row, which
        # the meter leaves out (the memory model counts it once, :func:`costlab.measure.memory._window`); the
        # targets' view is not contiguous, so the loss copies it, as in the run
        window = torch.zeros(rows, tokens + 1, dtype=torch.long)
        ids, targets = window[:, :-1], window[:, 1:]
        if part == "first":
            forward = _first_stage(model)
        elif part == "later":  # its input, the receive buffer the stage counts apart, made outside the meter
            width = (model.wte if hasattr(model, "blocks") else model.get_input_embeddings()).embedding_dim
            ids = torch.zeros(rows, tokens, width, dtype=dtype, requires_grad=True)
            forward = _later_stage(model)
        model.train()
        if mode != "none":
            apply_ac(model if hasattr(model, "blocks") else _Blocks(_layers(model)), mode)
        # weights in a low precision: FSDP's mixed precision gathers them so, and casts costlab's blocks' inputs
        if hasattr(model, "blocks") and dtype != torch.float32 and fsdp_casts_block_inputs(mode):
            _cast_block_inputs(model, dtype)
        with SavedActivations(model) as meter:
            meter.skip.add(window.untyped_storage()._cdata)
            on = autocast != "None"
            with torch.autocast("cpu", dtype=getattr(torch, autocast)) if on else contextlib.nullcontext():
                box = [forward(ids)]
                if cached:
                    held, kept = _held(meter, box, targets, part)
            if not cached:
                held, kept = _held(meter, box, targets, part)
        del kept, model
    return float(held)


def _cast_block_inputs(model: Any, dtype: Any) -> None:
    """Cast each of costlab's blocks' floating inputs to ``dtype`` before the block runs (and before its
    checkpointing, which then keeps the copies), as FSDP's mixed precision does where it gathers the weights in
    ``dtype`` (:func:`costlab.parallelism.fsdp.apply_fsdp`'s ``cast_block_inputs``): a Llama-style block's rotary
    tables become one copy a block, which its queries and keys share, where each would make its own."""
    import torch
    from torch.utils._pytree import tree_map

    def cast(value: Any) -> Any:
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    for block in model.blocks.values():
        block.register_forward_pre_hook(lambda _, args, kwargs: tree_map(cast, (args, kwargs)), prepend=True,
                                        with_kwargs=True)


def _held(meter: Any, box: list, targets: Any, part: str) -> tuple[float, Any]:
    """What ``meter`` reads once the forward's output (``box``'s one tensor, taken out) has gone where the run
    sends it: a pipeline stage's output, which the schedule keeps, counted apart; a model's logits into the loss,
    then freed, as the trainer frees them before backward (nothing saves them). Returns the reading and what must
    stay alive until the trace ends."""
    from costlab.models.loss import loss_fn

    out = box.pop()
    if part != "model":
        return meter.alive() - out.untyped_storage().nbytes(), out
    loss = loss_fn(out, targets)
    del out
    return meter.alive(), loss


def _first_stage(model: Any) -> Any:
    """``model``'s forward as a pipeline's first stage runs it: to the last layer's output, without the modules
    after the layers (a final norm, a head)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's adapters, in place
    if hasattr(model, "blocks"):  # costlab's own GPT
        model.ln_f = model.lm_head = None
        return model
    from costlab.models.hf import cut_decoder_ends

    cut_decoder_ends(model, first=True, last=False)
    base = model.get_decoder()
    return lambda ids: base(input_ids=ids, use_cache=False).last_hidden_state


def _later_stage(model: Any) -> Any:
    """``model``'s forward as a pipeline stage after the first and before the last runs it: from the hidden state
    the previous stage sent to its last layer's output, without the modules before and after its layers."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's adapters, in place
    if hasattr(model, "blocks"):  # costlab's own GPT takes the hidden state in where it has no embedding
        model.wte = model.wpe = model.ln_f = model.lm_head = None
        return model
    from costlab.models.hf import cut_decoder_ends

    cut_decoder_ends(model, first=False, last=False)
    base = model.get_decoder()
    return lambda hidden: base(inputs_embeds=hidden, use_cache=False).last_hidden_state


def _fake_model(source: str, tp: int, layers: int, dtype: Any, attn: str, adapters: str = "") -> tuple[Any, Any]:
    """The model (under the caller's fake mode) with ``layers`` layers, and its forward from token ids to logits.
    ``adapters``: a fine-tuning run's LoRA adapters as JSON (:func:`adapters_key`), injected as the run injects them
    (the rest frozen, so that its backward computes no weight gradients for the base); with ``nf4`` (the run's NF4
    backend), each adapted base weight is dequantized where the run's NF4 weight is: once in its forward and once in
    its backward."""
    model, forward = _plain_fake_model(source, tp, layers, dtype, attn)
    if adapters:
        from unittest import mock

        import torch

        from costlab.models.adapters import _lora_layers, lora

        node = json.loads(adapters)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the adapters made in the base's dtype, on the fake CPU tensors' device:
        try:  # nothing for PEFT to move (a module's .to() cannot swap fake parameters in place)
            with mock.patch.object(torch.nn.Module, "to", lambda module, *a, **k: module):
                model = lora(model, node["rank"], node["alpha"], node["dropout"], node["targets"])
        finally:
            torch.set_default_dtype(default)
        if node.get("nf4"):
            for layer in _lora_layers(model):
                _dequantized_in_place(layer.get_base_layer(), node["nf4"] == "bitsandbytes")
    return model, forward


def adapters_key(cfg: DictConfig) -> str:
    """A run's LoRA adapters as the traces take them (JSON: rank, alpha, dropout, targets, and ``nf4``, the backend
    that holds the base in NF4, or false), or "" for a run that trains every parameter."""
    from costlab.models.adapters import holds_nf4, nf4_backend, uses_adapters

    if not uses_adapters(cfg):
        return ""
    f = cfg.finetune
    return json.dumps({"rank": int(f.rank), "alpha": float(f.alpha), "dropout": float(f.dropout),
                       "targets": list(f.targets), "nf4": nf4_backend(cfg) if holds_nf4(cfg) else False},
                      sort_keys=True)


def _dequantized_in_place(linear: Any, output_in_input_dtype: bool = False) -> None:
    """``linear`` computes as an NF4 base does (torchao's ``linear_nf4``, bitsandbytes' ``Linear4bit``): its frozen
    weight is written out in the input's dtype before the forward's matmul and again before the backward's (the
    bytes a dequantization writes; its lookups' reads are left out), and nothing of it is saved.
    ``output_in_input_dtype``: bitsandbytes computes in its compute dtype (autocast's) and casts its output back to
    its input's: an fp32 input (a norm's output under autocast) gives an fp32 output, twice autocast's bytes, which
    what follows may save (the MLP's activation saves its input)."""
    import torch

    class Dequantized(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any) -> Any:
            ctx.weight = weight
            out = torch.nn.functional.linear(x, weight.to(x.dtype, copy=True), bias)
            return out.to(x.dtype) if output_in_input_dtype else out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return grad @ ctx.weight.to(grad.dtype, copy=True), None, None

    linear.forward = lambda x: Dequantized.apply(x, linear.weight, linear.bias)


def _plain_fake_model(source: str, tp: int, layers: int, dtype: Any, attn: str) -> tuple[Any, Any]:
    if source.startswith("{"):  # costlab's own model: its ``model`` node
        import torch

        from costlab.models.gpt import build_model

        node = OmegaConf.create(json.loads(source))
        node.n_layer = layers
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the weights in the dtype FSDP gathers them in
        try:
            model = build_model(node)
        finally:
            torch.set_default_dtype(default)
        if tp > 1:  # its blocks as a tensor-parallel rank holds them (the attention reshapes with -1 heads)
            from costlab.parallelism.tp import gpt_layer_plan

            _rank_projections(model.blocks.values(), gpt_layer_plan(node.get("mlp") == "swiglu"), tp)
        return model, model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_config(source, layers), dtype=dtype, attn_implementation=attn)
    if tp > 1:
        _tp_rank_layers(model, tp)
    return model, lambda ids: model(input_ids=ids, use_cache=False).logits


def _layers(model: Any) -> Any:
    from costlab.models.hf import decoder_layers

    return decoder_layers(model)


class _Blocks:
    """What :func:`costlab.parallelism.techniques.apply_ac` reads: the decoder layers as ``blocks``."""

    def __init__(self, layers: Any):
        from torch import nn

        self.blocks = nn.ModuleDict({str(i): layer for i, layer in enumerate(layers)})


def _config(source: str, layers: int) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list) and kinds:  # sliding-window families name each layer's kind: the pattern repeats
        config.layer_types = [kinds[i % len(kinds)] for i in range(layers)]
    config.use_cache = False
    return config


def _tp_rank_layers(model: Any, tp: int) -> None:
    """Each decoder layer's projections, in place, as one of ``tp`` tensor-parallel ranks holds them (its family's
    split, :func:`costlab.parallelism.tp.hf_layer_plan`): a column-wise one with 1/tp of its outputs (whole heads;
    of each part, GPT-2's packed c_attn, whose attention then cuts parts 1/tp as wide), a row-wise one with 1/tp of
    its inputs. The attention reshapes with ``-1`` heads, as it does on a rank."""
    from costlab.parallelism.tp import hf_layer_plan

    _rank_projections(_layers(model), hf_layer_plan(model.config.model_type), tp)


def _rank_projections(layers: Any, plan: dict[str, str], tp: int) -> None:
    """Each of ``layers``' projections split by ``plan`` as one of ``tp`` ranks holds it (:func:`_tp_rank_layers`)."""
    from torch import nn

    from costlab.parallelism.tp import rank_packed_attention

    for layer in layers:
        for name, style in plan.items():
            if style not in ("colwise", "qkv_colwise", "rowwise"):  # replicated, or fed this rank's heads (per_head)
                continue
            parent, _, attr = name.rpartition(".")
            owner = layer.get_submodule(parent)
            whole = getattr(owner, attr)
            conv1d = type(whole).__name__ == "Conv1D"  # GPT-2's: a weight of inputs x outputs
            inputs, outputs = tuple(whole.weight.shape) if conv1d else (whole.in_features, whole.out_features)
            shape = (inputs // tp, outputs) if style == "rowwise" else (inputs, outputs // tp)
            dtype = whole.weight.dtype
            if conv1d:
                part = type(whole)(shape[1], shape[0])
                part.weight = nn.Parameter(part.weight.new_empty(shape, dtype=dtype))
                part.bias = nn.Parameter(part.bias.new_empty(shape[1:], dtype=dtype))
                setattr(owner, attr, part)
            else:
                setattr(owner, attr, nn.Linear(*shape, bias=whole.bias is not None, dtype=dtype))
            if style == "qkv_colwise":
                rank_packed_attention(owner, tp)


def _hf_only(source: str) -> Any:
    """:func:`_quiet` and :func:`_whole_rows` for a Hugging Face model; nothing (no ``transformers`` import) for
    costlab's own."""
    import contextlib

    if source.startswith("{"):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(_quiet())
    stack.enter_context(_whole_rows())
    return stack


def _whole_rows() -> Any:
    """``transformers`` looks for packed sequences in the position ids; on fake tensors it cannot read them, so it
    builds an explicit attention mask that the run never builds. costlab's rows are whole windows, never packed:
    the trace is told so, as the run finds."""
    from unittest import mock

    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        import contextlib

        return contextlib.nullcontext()
    return mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)


def _quiet() -> Any:
    """``transformers``' warnings about weights it initialises are not this trace's business."""
    import contextlib

    from transformers.utils import logging

    @contextlib.contextmanager
    def quiet():
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            yield
        finally:
            logging.set_verbosity(level)

    return quiet()
