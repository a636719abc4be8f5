"""The time model: a training step's seconds predicted from its parts and this machine's measured rates, logged
as ``perf/predicted_tokens_per_s`` beside the measured ``perf/tokens_per_s``.

The work comes from the run's own code run on fake tensors (shapes, no data: :mod:`costlab.measure.traced`): one
micro-batch's forward, loss and backward with one and with two layers (so a pipeline stage or a 70B model costs
the same to trace), under the run's checkpointing mode and precision, counted three ways:

    flops  the matmuls' and attention's FLOPs (PyTorch's FlopCounterMode: recomputed blocks included)
    ops    every aten op dispatched (each one pays the framework's fixed cost: dispatch, autograd, a kernel launch)
    bytes  what the other ops write (pointwise work, norms, softmax, casts: bound by memory bandwidth)

and the optimizer's step once, traced with the run's own optimizer. A rank's step is then

    compute(w) = w.flops / matmul rate + w.bytes / memory bandwidth + w.ops x seconds per op
    step       = micro-batches x compute(one micro-batch on this rank) + compute(optimizer step)
                 + the pipeline's bubble: (pp - 1) micro-batch slots (/ stages per rank when interleaved)
                 + each collective: latency + bytes / bandwidth, both probed per kind of collective (all-reduce
                   moves 2 (n-1)/n of its bytes, all-gather and reduce-scatter (n-1)/n): DDP's gradient all-reduce
                   once per step, FSDP's all-gathers (forward and backward) per layer and micro-batch and its
                   reduce-scatters per accumulated micro-batch, tensor parallel's two all-reduces per layer forward
                   and two backward, the pipeline's sends and receives (on a GPU, FSDP's and DDP's run beside the
                   compute: what exceeds it is added, and a calibrated share of what it hides)

Tensor parallel divides a layer's FLOPs and bytes by its degree (not its ops: every rank runs every op). Nothing
overlaps on CPU: gloo's collectives run on the same cores as the compute. On a CPU run, what a micro-batch costs
beyond its matmuls is taken from the run's own model probed plain on the run's micro-batch (:class:`ModelProbe`):
less the ops' fixed costs, its remainder gives the rate its ops write their bytes at (a small model's pointwise
work is in cache and bound by arithmetic, not by the memory's bandwidth). FSDP, tensor parallel and DDP add what
the run's own wrapping costs, probed on the run's model (:func:`layout_seconds`: per layer and micro-batch, outside
the layers, and per step; DDP's for the one micro-batch a step it syncs, its all-reduces in it); a pipeline adds
what the run's own schedule costs beyond its stages' compute and bubble, probed on the run's stages
(:func:`schedule_seconds`: per schedule step, the sends' fixed costs and a stage's wrapping in it).

The rates are measured by probes at the end of the run, on every rank at once (:func:`probe_ranks`): the run's own
matmul shapes in its dtype, the bytes an elementwise add on large buffers writes per second, the seconds per op of
a chain of small autograd ops (and of views), each collective at two sizes, the run's model plain, and the
layout's wrapping or schedule. A plan predicts a card that is not here from its ``hardware`` option's published
figures times the efficiencies calibrated on published A100 runs (:func:`gpu_rates`). A run on a GPU probes its
own card at the end of the run (:func:`card_probes`: the run's matmul shapes, the host's dispatch per op, a large
add, the run's model plain on its micro-batch) and predicts with those in place of the calibrated shares
(:func:`card_rates`; attention's rate, the network and, across nodes, the links stay the option's), and logs its
plan's figure beside (``perf/planned_tokens_per_s``).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

PREDICTED_TOKENS_PER_S = "perf/predicted_tokens_per_s"
PREDICTED_STEP_MS = "perf/predicted_step_time_ms"
PLANNED_TOKENS_PER_S = "perf/planned_tokens_per_s"  # a GPU run's: its plan's prediction, from calibrated rates alone
PREDICTED_USD_TRAIN = "cost/predicted_usd_per_1m_train_tokens"
TIME_MODEL_TAG = "costlab.time_model"  # the rates and parts behind the prediction, or why there is none

MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product")  # FLOP-bound: counted as FLOPs, not bytes


@dataclass
class Work:
    """What one rank computes: matmul FLOPs, aten ops, and bytes written by the other ops."""

    flops: float = 0.0
    ops: float = 0.0  # ops that compute (a kernel each)
    bytes: float = 0.0
    views: float = 0.0  # ops that only make a view (metadata, no kernel)
    forward_ops: float = 0.0  # ops and views outside backward (the forward pass; not checkpointing's recompute)
    attention: float = 0.0  # the fused attention kernels' FLOPs (the whole square; part of ``flops``)

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(self.fields(), other.fields(), strict=True)))

    def __sub__(self, other: Work) -> Work:
        return Work(*(a - b for a, b in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[float, ...]:
        return self.flops, self.ops, self.bytes, self.views, self.forward_ops, self.attention

    def scaled(self, flops: float = 1.0, ops: float = 1.0, data: float = 1.0) -> Work:
        return Work(self.flops * flops, self.ops * ops, self.bytes * data, self.views * ops, self.forward_ops * ops,
                    self.attention * flops)


@dataclass
class Rates:
    """This machine's measured rates, per rank."""

    matmul_flops: float  # FLOP/s
    bytes_per_s: float  # memory bandwidth
    op_s: float  # seconds per aten op that computes (dispatch, autograd and a kernel's fixed cost)
    view_s: float  # seconds per aten op that only makes a view
    link: dict[str, tuple[float, float]] = field(default_factory=dict)  # collective -> (latency s, bytes/s)
    source: str = ""
    policy_op_s: float = 0.0  # an op seen by a Python dispatch mode (selective checkpointing's policy)
    # what the run's own tensor-parallel and FSDP wrapping adds to a micro-batch, per layer and outside the layers
    # (:func:`layout_seconds`; it holds those collectives' latencies)
    layout_layer_s: float = 0.0
    layout_outside_s: float = 0.0
    layout_step_s: float = 0.0  # and to a step's clipping and optimizer step
    # whether the layout's probe ran beside its peers, its collectives in it (a run's); a plan's ran without them
    # (:func:`local_layout`), its collectives priced by the link model
    layout_peers: bool = True
    # a plan's: per collective, the calls the layout's wrapping issued under the fake process group per layer and
    # outside the layers of a micro-batch, and per step (:func:`layout_calls`), each priced at the link's latency
    layout_calls: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # what one step of the run's own pipeline schedule adds beyond its stages' compute and bubble (its Python per
    # action, its sends' fixed costs, a stage's FSDP or tensor-parallel wrapping): :func:`schedule_seconds`
    schedule_s: float = 0.0
    # whether the layout's wrapping and the pipeline's schedule were probed: a probe's figure can be 0 (what it
    # timed was within the noise of what the model already prices), and a probe that ran still holds the fixed
    # costs the link model would otherwise add
    layout_probed: bool = False
    schedule_probed: bool = False
    # a GPU's (:func:`gpu_rates`): its attention kernels' own rate and the share of the square they compute (a
    # causal flash kernel skips the masked half), the link between nodes (``per_node`` ranks share one node),
    # the host's seconds per op (the GPU waits for it when its kernels are shorter), and whether data-parallel
    # collectives overlap the compute (they run on their own streams)
    attention_flops: float = 0.0
    causal_share: float = 1.0
    inter: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_node: int = 0
    host_op_s: float = 0.0
    overlap: bool = False
    overlap_cost: float = 0.0  # seconds a step still pays per second of collectives run beside its compute
    model: ModelProbe | None = None  # the run's own model, probed (None: ops x ``op_s`` and one memory rate)


class ModelProbe(NamedTuple):
    """The run's own model's forward and backward on the run's micro-batch, timed plain at two depths
    (:func:`depth_seconds`, :func:`per_layer`) on every rank at once, and the FLOP/s of its matmuls' shapes there
    (without tensor parallel's split): what a CPU run's micro-batch costs beyond its matmuls. The ops of a small
    model are not bound by the memory's bandwidth (a GELU's or a softmax's arithmetic on tensors in cache, a CPU
    attention kernel's), nor is their fixed cost a chain of multiplications'."""

    layer_s: float  # per layer
    outside_s: float  # outside the layers
    matmul_flops: float


@dataclass
class Prediction:
    step_s: float
    tokens_per_s: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds by part
    notes: list[str] = field(default_factory=list)  # what stood in for what
    gaps: list[str] = field(default_factory=list)  # what is not priced, or priced without what it needs (a plan's)

    def tag(self, rates: Rates) -> str:  # a probed part is named at 0 too: it was probed and came to nothing
        parts = ", ".join(f"{k} {v * 1000:.3g} ms" for k, v in self.parts.items() if v or k in PROBED_PARTS)
        return (f"{parts}; rates: matmul {rates.matmul_flops / 1e9:.3g} GFLOP/s, memory {rates.bytes_per_s / 1e9:.3g}"
                f" GB/s, {rates.op_s * 1e6:.3g} us per op, {rates.view_s * 1e6:.3g} us per view, "
                + "".join(f"{k} {lat * 1e6:.3g} us + {bw / 1e9:.3g} GB/s, " for k, (lat, bw) in rates.link.items())
                + (f"{rates.policy_op_s * 1e6:.3g} us per policed op, " if rates.policy_op_s else "")
                + (f"the layout's wrapping {rates.layout_layer_s * 1e3:.3g} ms per layer and "
                   f"{rates.layout_outside_s * 1e3:.3g} ms outside per micro-batch, "
                   f"{rates.layout_step_s * 1e3:.3g} ms per step, " if rates.layout_probed else "")
                + (f"the pipeline's schedule {rates.schedule_s * 1e3:.3g} ms per schedule step beyond its "
                   "stages' compute and bubble, " if rates.schedule_probed else "")
                + f"({rates.source})" + "".join(f"; {n}" for n in [*self.notes, *self.gaps]))


PROBED_PARTS = ("layout", "schedule")  # the step's parts a probe of the run's own layout or schedule priced


class _Counter:
    """Counts aten ops and the bytes the non-matmul, non-view ones write (a TorchDispatchMode, built lazily)."""

    def __new__(cls) -> Any:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Counter(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.ops, self.views, self.bytes, self.forward_ops = 0, 0, 0, 0
                self.attention: dict[str, float] = {}  # op -> FLOPs of fused attention kernels, counted here

            def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
                out = func(*args, **(kwargs or {}))
                self.forward_ops += torch._C._current_graph_task_id() == -1
                if func.is_view:
                    self.views += 1
                    return out
                self.ops += 1
                name = func.__name__.split(".")[0]
                if name.startswith("_scaled_dot_product"):  # QK^T and AV: 4 b h t s d forward, twice that back
                    q, k = args[0], args[1]
                    b, h, t, d = q.shape
                    flops = 4 * b * h * t * k.shape[-2] * d * (2 if name.endswith("backward") else 1)
                    self.attention[str(func.overloadpacket)] = self.attention.get(str(func.overloadpacket), 0) + flops
                if not name.startswith(MATMULS):
                    self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out)
                                      if isinstance(t, torch.Tensor))
                return out

        return Counter()


# the c10d ops (PyTorch's functional collectives, DTensor's, and the in-place ones FSDP2 and DDP call) by the
# collective of the link model whose fixed cost each pays (a broadcast's, one rank's data to all, an all-gather's)
COLLECTIVE_OPS = (("all_reduce", ("allreduce", "all_reduce")),
                  ("all_gather", ("allgather", "all_gather", "broadcast")),
                  ("reduce_scatter", ("reduce_scatter",)))


def collective_kind(op: str) -> str | None:
    """The link model's collective for the c10d op named ``op`` (``c10d.allreduce_``,
    ``_c10d_functional.all_gather_into_tensor``...; a coalesced op is one call), None for any other op (a wait)."""
    from costlab.measure.activations import COLLECTIVES as NAMESPACES

    namespace, _, name = op.partition(".")
    if namespace not in NAMESPACES:
        return None
    return next((kind for kind, names in COLLECTIVE_OPS if name.lstrip("_").startswith(names)), None)


class _CollectiveCounter:
    """Counts the collectives dispatched, per :func:`collective_kind` (a TorchDispatchMode, built lazily)."""

    def __new__(cls) -> Any:
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        class Collectives(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.calls: Counter[str] = Counter()

            def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
                kind = collective_kind(str(func))
                if kind:
                    self.calls[kind] += 1
                return func(*args, **(kwargs or {}))

        return Collectives()


@functools.lru_cache(maxsize=1024)  # a few floats each: a plan search or a benchmark traces many
def _trace(source: str, autocast: str, weights: str, tokens: int, attn: str, adapters: str, layers: int, mode: str,
           rows: int) -> tuple[float, float, float, float, float, float]:
    """(FLOPs, ops, bytes, views, forward ops, attention FLOPs) of one forward, loss and backward of
    ``rows`` sequences, on fake tensors; ``adapters``: a fine-tuning run's
    (:func:`costlab.measure.traced.adapters_key`), whose frozen base computes no weight gradients."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from costlab.measure.traced import _Blocks, _fake_model, _hf_only, _layers
    from costlab.models.loss import loss_fn
    from costlab.parallelism.techniques import apply_ac

    with FakeTensorMode(), _hf_only(source):
        model, forward = _fake_model(source, 1, layers, getattr(torch, weights), attn, adapters)
        model.train()
        if mode != "none":
            apply_ac(model if hasattr(model, "blocks") else _Blocks(_layers(model)), mode)
        ids = torch.zeros(rows, tokens, dtype=torch.long)
        counter = _Counter()
        with FlopCounterMode(display=False) as flops, counter:
            if autocast != "None":
                with torch.autocast("cpu", dtype=getattr(torch, autocast)):
                    logits = forward(ids)
            else:
                logits = forward(ids)
            loss_fn(logits, ids).backward()
    # PyTorch's counter knows some attention kernels (CUDA's) and not others (the CPU's flash kernel): those it
    # does not know are counted here, as the cost model counts attention (the whole square, as the kernels run)
    known = {str(op) for op in flops.get_flop_counts().get("Global", {})}
    attention = sum(v for op, v in counter.attention.items() if op not in known)
    total = float(flops.get_total_flops() + attention)
    return (total, float(counter.ops), float(counter.bytes), float(counter.views), float(counter.forward_ops),
            float(sum(counter.attention.values())))


@functools.lru_cache(maxsize=256)
def _optimizer_trace(source: str, optimizer: str, adapters: str, layers: int,
                     build: Any) -> tuple[float, float, float, float, float, float]:
    """(ops, bytes, views, weights it updates, frozen weights held dense, frozen weights held in NF4) of the run's
    optimizer step (clipping and zeroing included) over a model of ``layers`` layers with the run's adapters, on
    fake tensors: the second step (the first creates the state)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from costlab.measure.traced import _fake_model, _hf_only

    cfg = OmegaConf.create(json.loads(optimizer))
    with FakeTensorMode(), _hf_only(source):
        model, _ = _fake_model(source, 1, layers, torch.float32, "sdpa", adapters)
        params = [p for p in model.parameters() if p.requires_grad]
        frozen = [(n, p.numel()) for n, p in model.named_parameters() if not p.requires_grad]
        held_in_nf4 = bool(adapters) and json.loads(adapters)["nf4"]
        nf4 = float(sum(k for n, k in frozen if n.endswith("base_layer.weight"))) if held_in_nf4 else 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = build(model, cfg)
        opt.step()
        counter = _Counter()
        with counter:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return (float(counter.ops), float(counter.bytes), float(counter.views), float(sum(p.numel() for p in params)),
            float(sum(k for _, k in frozen)) - nf4, nf4)


def _source(cfg: DictConfig) -> str:
    from costlab.measure.traced import hf_source
    from costlab.models.hf_config import is_hf

    return hf_source(cfg) if is_hf(cfg) else json.dumps(OmegaConf.to_container(cfg.model, resolve=True),
                                                         sort_keys=True)


def layer_work(cfg: DictConfig, rows: int, fsdp: bool, mode: str | None = None) -> tuple[Work, Work]:
    """(one layer, everything outside the layers) of one micro-batch of ``rows`` sequences, under checkpointing
    ``mode`` (default the run's)."""
    from costlab.measure.traced import adapters_key

    m = cfg.model
    autocast = cfg.precision.get("autocast_dtype")
    weights = autocast if fsdp and autocast else "float32"
    key = (_source(cfg), str(autocast), weights, int(m.block_size), str(m.get("attn_implementation", "sdpa")),
           adapters_key(cfg))
    mode = mode or cfg.trainer.get("activation_checkpointing", "none")
    one, two = (Work(*_trace(*key, n, mode, rows)) for n in (1, 2))
    layer = two - one
    return layer, one - layer


class Weights(NamedTuple):
    """A model part's weights by how a step treats them: ``trained`` (a gradient each, reduced across data-parallel
    ranks, and the optimizer's update), ``frozen`` (held in the model's dtype, gathered by FSDP, nothing reduced:
    LoRA's base) and ``nf4`` (frozen and held in NF4: QLoRA's adapted base weights)."""

    trained: float
    frozen: float = 0.0
    nf4: float = 0.0

    def times(self, k: float) -> Weights:
        return Weights(*(k * w for w in self))

    def plus(self, other: Weights) -> Weights:
        return Weights(*(a + b for a, b in zip(self, other, strict=True)))


def _nf4_bytes_per_value() -> float:
    """Packed 4-bit codes and a byte-sized scale per block (:func:`costlab.models.adapters.nf4_bytes`; the
    second-level scales and code tables are tiny)."""
    from costlab.models.adapters import NF4_BLOCK

    return 0.5 + 1 / NF4_BLOCK


def optimizer_work(cfg: DictConfig, build: Any) -> tuple[Work, Work, Weights, Weights, str]:
    """The optimizer step's work for one layer and outside the layers (FLOPs none: it is pointwise), the weights of
    one layer and outside (:class:`Weights`: those it updates, and a fine-tuning run's frozen ones), and a note when
    another optimizer stood in for the run's. ``build(model,
    cfg)``: the trainer's optimizer constructor (:func:`costlab.training.optimizers.build_optimizer`), handed in:
    measure/ does not reach into training/. An optimizer outside ``torch.optim`` (torchao's low-bit AdamWs,
    whose step is compiled code that cannot run on fake tensors) is traced as ``torch.optim.AdamW``."""
    from costlab.measure.traced import adapters_key

    t = cfg.trainer
    option = OmegaConf.to_container(cfg.optimizer, resolve=True)
    note = ""
    if not str(option.get("_target_", "")).startswith("torch.optim."):
        note = (f"optimizer={option.get('name')} traced as torch.optim.AdamW (its compiled step cannot run on fake "
                "tensors)")
        option = {"_target_": "torch.optim.AdamW", "name": "adamw"}
    node = {"optimizer": option,
            "trainer": {"lr": float(t.lr), "betas": list(t.betas), "weight_decay": float(t.weight_decay)}}
    key = (_source(cfg), json.dumps(node, sort_keys=True), adapters_key(cfg))
    (ops1, data1, views1, *w1), (ops2, data2, views2, *w2) = (_optimizer_trace(*key, n, build) for n in (1, 2))
    one, layer = Work(0.0, ops1, data1, views1), Work(0.0, ops2 - ops1, data2 - data1, views2 - views1)
    layer_weights = Weights(*(b - a for a, b in zip(w1, w2, strict=True)))
    return layer, one - layer, layer_weights, Weights(*w1).plus(layer_weights.times(-1.0)), note


def _collective(rates: Rates, n: int, data: float, kind: str, latency: bool = True, span: int = 0,
                calls: float = 1) -> float:
    """Seconds of one ``kind`` collective of ``data`` bytes over ``n`` ranks (a send: an all-gather's latency
    and bandwidth, one way), or of ``calls`` of them that move ``data`` bytes in all (each pays the fixed cost).
    ``span``: how many consecutive ranks the group's members range over; a group that spans more than a node
    crosses the network (``rates.inter``, per GPU) where the rates know one; NCCL then runs a ring per NIC, so the
    group's members in a node add their NICs' bandwidth, up to NVLink's."""
    if n <= 1 or not rates.link:
        return 0.0
    share = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
             "p2p": 1.0}[kind]
    crosses = rates.inter and rates.per_node and span > rates.per_node
    fixed, bandwidth = (rates.inter if crosses else rates.link)["all_gather" if kind == "p2p" else kind]
    if crosses and kind != "p2p":  # NCCL runs one ring per NIC: a node's members share its NICs' bandwidth
        members = max(1.0, n * rates.per_node / span)
        bandwidth = min(rates.link[kind][1], bandwidth * members)
    return (calls * fixed if latency else 0.0) + share * data / bandwidth


def tp_collectives(cfg: DictConfig, shapes: Any, rows: int, layers: float,
                   fsdp: bool) -> list[tuple[str, float, float]]:
    """Tensor parallel's collectives in one micro-batch's forward and backward of ``rows`` sequences on a rank that
    holds ``layers`` layers of a model of ``shapes`` (its width and vocabulary), each as (kind, calls, bytes a call),
    from the layout's own split (:func:`costlab.parallelism.tp.layer_all_reduces`): a block's row-wise outputs
    all-reduced in forward, in the autocast dtype of the matmuls that made them; its column-wise inputs' gradients
    in backward, in the residual stream's dtype; the embeddings' partial rows (the token embedding's, and a learned
    position embedding's, one row a position) and the head's input gradient all-reduced; the head's logits
    all-gathered over the vocabulary (a pipeline: the whole model's, as its compute outside the layers)."""
    from costlab.measure.memory import _autocast_bytes, _residual_bytes
    from costlab.models.hf_config import is_hf
    from costlab.parallelism.tp import HF_LAYER_PLAN, gpt_layer_plan, layer_all_reduces

    hf = is_hf(cfg)
    forward, backward = layer_all_reduces(HF_LAYER_PLAN if hf else gpt_layer_plan(cfg.model.get("mlp") == "swiglu"))
    block, width = int(cfg.model.block_size), int(shapes.n_embd)
    residual, computed = _residual_bytes(cfg, fsdp), _autocast_bytes(cfg)
    positions = 0 if hf or cfg.model.get("pos", "learned") != "learned" else 1
    return [("all_reduce", forward * layers, rows * block * width * computed),
            ("all_reduce", backward * layers + 2, rows * block * width * residual),  # + the head's, the tokens'
            ("all_reduce", positions, block * width * residual),
            ("all_gather", 1, rows * block * int(shapes.vocab_size) * computed)]


def predict_step(cfg: DictConfig, world: int, rates: Rates, build_optimizer: Any,
                 traced_rows: int | None = None) -> Prediction:
    """The step's seconds on each rank (the slowest), from the traced work and ``rates`` (see the module);
    ``build_optimizer``: the trainer's optimizer constructor (:func:`optimizer_work`). ``traced_rows``: trace that
    many sequences and scale FLOPs and bytes to the micro-batch's (a plan's many micro-batch sizes share one
    trace; ops do not scale); default: trace the micro-batch itself."""
    from costlab.measure.memory import _residual_bytes
    from costlab.models.hf_config import is_hf
    from costlab.parallelism.dims import parallel_dims

    t, m, p = cfg.trainer, cfg.model, cfg.parallelism
    if not is_hf(cfg) and "n_layer" not in m:
        raise ValueError(f"model={m.name} has no layers to trace")
    dims = parallel_dims(p, world)
    micro = int(p.microbatches) if dims.pp_enabled else 1
    rows = max(1, int(t.batch_size // dims.dp // t.grad_accum_steps // micro))
    traced = traced_rows or rows
    layer, outside = (w.scaled(flops=rows / traced, ops=1.0, data=rows / traced)
                      for w in layer_work(cfg, traced, dims.fsdp_enabled))
    if is_hf(cfg):
        from costlab.measure.traced import hf_shapes

        shapes = hf_shapes(cfg)
    else:
        shapes = m
    n_layer = int(shapes.n_layer) if hasattr(shapes, "n_layer") and shapes.n_layer is not None else 0
    v = int(p.stages_per_rank) if dims.pp_enabled and p.schedule == "interleaved_1f1b" else 1
    layers = n_layer / dims.pp
    tp = dims.tp
    per_mb = layer.scaled(flops=layers / tp, ops=layers, data=layers / tp) + outside.scaled(flops=1 / tp)

    def matmuls(w: Work, rate: float = rates.matmul_flops) -> float:
        return (w.flops - w.attention) / rate + w.attention * rates.causal_share / (rates.attention_flops or rate)

    def compute(w: Work) -> float:
        device = matmuls(w) + w.bytes / rates.bytes_per_s + w.ops * rates.op_s + w.views * rates.view_s
        return max(device, (w.ops + w.views) * rates.host_op_s)  # a GPU waits for its host's dispatch

    n_mb = int(t.grad_accum_steps) * micro
    opt_layer, opt_outside, layer_weights, outside_weights, note = optimizer_work(cfg, build_optimizer)
    opt = opt_layer.scaled(ops=layers, data=layers) + opt_outside  # each rank steps every tensor it holds a part of
    notes = [note] if note else []
    optimizer = compute(opt.scaled(data=1 / (dims.dp_shard * tp)))
    if rates.model:  # the run's own model's forward and backward, probed plain on the run's micro-batch
        probe = rates.model
        plain = layer_work(cfg, rows, False)  # the probe's work: the run's micro-batch, unwrapped
        fixed, write = [], []
        for w, seconds in zip(plain, (probe.layer_s, probe.outside_s), strict=True):
            rest = max(0.0, seconds - matmuls(w, probe.matmul_flops))  # what is not the matmuls: its ops' fixed
            fixed.append(min(rest, w.ops * rates.op_s + w.views * rates.view_s))  # costs and their bytes' writes
            write.append(w.bytes / (rest - fixed[-1]) if rest > fixed[-1] and w.bytes else rates.bytes_per_s)
        # the bytes the probe's plain model writes: what FSDP's weights gathered in low precision change (fewer
        # casts) is in the layout's probe (wrapped less plain), not assumed here
        one_mb = (matmuls(per_mb) + layers / tp * plain[0].bytes / write[0] + plain[1].bytes / write[1]
                  + layers * fixed[0] + fixed[1])
        notes.append(f"the run's model probed plain on its micro-batch at depths {LAYOUT_DEPTHS}: "
                     f"{probe.layer_s * 1e3:.3g} ms per layer and {probe.outside_s * 1e3:.3g} ms outside, its "
                     f"matmuls there {probe.matmul_flops / 1e9:.3g} GFLOP/s, its other ops write "
                     f"{write[0] / 1e9:.3g} GB/s in a layer and {write[1] / 1e9:.3g} GB/s outside")
    else:
        one_mb = compute(per_mb)
    parts = {"compute": n_mb * one_mb, "optimizer": optimizer}
    if dims.pp_enabled:
        parts["bubble"] = (dims.pp - 1) / v * one_mb
    weights = layer_weights.times(layers).plus(outside_weights)  # this stage's (the outside: at most all of it)
    grad_bytes = 4 * weights.trained / tp  # a fine-tuning run's: its adapters' alone
    activation = rows * int(m.block_size) * int(shapes.n_embd) * _residual_bytes(cfg, dims.fsdp_enabled)
    comm, data_parallel = 0.0, 0.0
    shard_span = dims.dp_shard * tp  # the mesh's inner dimensions: tp innermost, then dp_shard, dp_replicate
    # DDP all-reduces once a step (no_sync until the last micro-batch); FSDP2 reduces each accumulated micro-batch's
    # gradients (costlab's trainer, like Composer's, leaves FSDP's gradient sync on; a pipeline schedule turns it
    # off but for its last backward)
    syncs = int(t.grad_accum_steps) if dims.fsdp_enabled else 1
    # the run's own wrapping or pipeline schedule, probed, holds the layout's collectives' fixed costs (FSDP's and
    # DDP's whole)
    probed = rates.layout_peers and (rates.layout_probed or rates.schedule_probed)  # a plan's ran without them
    # a plan's wrapping, probed without its peers, counted its collectives (:func:`local_probes`; a pipeline's are
    # in its schedule's probe, uncounted): each pays the link's latency, the formulas below keep their bytes
    counted = bool(rates.layout_calls)
    if dims.dp_replicate > 1 and not probed:  # a probed DDP's wrapping holds its own all-reduces
        data_parallel += syncs * _collective(rates, dims.dp_replicate, grad_bytes / dims.dp_shard, "all_reduce",
                                             latency=not counted, span=dims.dp_replicate * shard_span)
    # a DDP's wrapping runs once a step: it syncs one micro-batch a step, the others run under no_sync, its hooks idle
    wrapped_mbs = 1 if dims.ddp_enabled else n_mb  # (a run's DDP combines with no other degree)
    if rates.layout_probed:  # the run's own wrapping: FSDP's gathers and reduce-scatters whole, TP's fixed costs,
        # DDP's sync whole
        parts["layout"] = (wrapped_mbs * (layers * rates.layout_layer_s + rates.layout_outside_s)
                           + rates.layout_step_s)
    if counted and rates.link:
        calls = {kind: wrapped_mbs * (layers * layer + outside_calls) + step
                 for kind, (layer, outside_calls, step) in rates.layout_calls.items()}
        comm += sum(n * rates.link[kind][0] for kind, n in calls.items() if kind in rates.link)
        notes.append("the layout's collectives counted as its rank 0 issued them: " + ", ".join(
            f"{n:.4g} {kind}" for kind, n in calls.items()) + " a step, each at the link's latency")
    if rates.schedule_probed:  # the run's own pipeline, probed: one schedule step per accumulated micro-batch group
        parts["schedule"] = int(t.grad_accum_steps) * rates.schedule_s
    if dims.fsdp_enabled and not probed:  # each layer's group and the rest's: gathered twice, reduced per sync
        # every weight, in the dtype FSDP's mixed precision gathers it in (an NF4 base: its codes and scales)
        width = 2 if cfg.precision.get("autocast_dtype") in ("bfloat16", "float16") else 4
        gathered = ((weights.trained + weights.frozen) * width + weights.nf4 * _nf4_bytes_per_value()) / tp
        units = math.ceil(layers) + 1  # FSDP2 gathers and reduces each block's group and the root's apart
        data_parallel += n_mb * 2 * _collective(rates, dims.dp_shard, gathered, "all_gather", span=shard_span,
                                                calls=units, latency=not counted)
        data_parallel += syncs * _collective(rates, dims.dp_shard, grad_bytes, "reduce_scatter", span=shard_span,
                                             calls=units, latency=not counted)
    if rates.overlap:  # a GPU's data-parallel collectives run on their own streams, beside the compute
        parts["exposed_data_parallel"] = max(0.0, data_parallel - parts["compute"])
        # and still cost the step part of what they hide: their kernels take SMs and memory bandwidth from the
        # matmuls beside them, and a layer's gather that is late holds its compute back
        parts["overlapped_data_parallel"] = rates.overlap_cost * min(data_parallel, parts["compute"])
    else:
        comm += data_parallel
    if tp > 1:  # its activations' all-reduces and its logits' all-gather (a probe holds or counted their calls)
        comm += n_mb * sum(calls * _collective(rates, tp, data, kind, latency=not (probed or counted), span=tp)
                           for kind, calls, data in tp_collectives(cfg, shapes, rows, layers, dims.fsdp_enabled))
    if cfg.trainer.get("activation_checkpointing", "none") == "selective" and not rates.model:
        # selective checkpointing's policy sees every op of a block's forward and of its recompute in Python
        plain, _ = layer_work(cfg, traced, dims.fsdp_enabled, "none")
        policed = layer.forward_ops + max(0.0, layer.ops + layer.views - plain.ops - plain.views)
        parts["selective_checkpointing"] = n_mb * layers * policed * max(0.0, rates.policy_op_s - rates.op_s)
    if dims.pp_enabled:  # each chunk's activation forward and gradient back
        comm += n_mb * 2 * v * _collective(rates, 2, activation, "p2p", latency=not probed,
                                           span=world // dims.pp + 1)
    parts["communication"] = comm
    step = sum(parts.values())
    return Prediction(step, t.batch_size * int(m.block_size) / step, parts, notes)


# --------------------------------------------------------------------------- probes of this machine's rates

BANDWIDTH_BYTES = 64 * 2**20  # each buffer of the memory probe: far beyond any cache
OP_CHAIN = 200  # small autograd ops per timed chain


KERNEL_CALLS = 10  # calls per timing on a GPU, between two CUDA events (one kernel takes microseconds)


def _on_card(device: Any) -> bool:
    import torch

    return device is not None and torch.device(device).type == "cuda"


def _wall_seconds(call: Any, device: Any = None) -> float:
    """Seconds of one ``call()`` on the host's clock; on a GPU from an idle card until the card has finished it."""
    import torch

    if _on_card(device):
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    call()
    if _on_card(device):
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _best_seconds(call: Any, min_s: float, device: Any = None) -> float:
    """Seconds of one ``call()``, the fastest of the timings within ``min_s`` after one warm-up call. On the CPU
    each timing is one call on the host's clock; on a GPU it is :data:`KERNEL_CALLS` calls between two CUDA events
    on the card's stream (the host's clock around one call would time its launch, not its kernel)."""
    import torch

    call()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < min_s:
        if _on_card(device):
            first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            first.record()
            for _ in range(KERNEL_CALLS):
                call()
            last.record()
            last.synchronize()
            best = min(best, first.elapsed_time(last) / 1e3 / KERNEL_CALLS)
        else:
            best = min(best, _wall_seconds(call))
    return best


def memory_bandwidth(min_s: float = 0.1, device: Any = None) -> float:
    """Bytes *written* per second by ``torch.add(a, b, out=c)`` on large fp32 buffers on ``device`` (default the
    CPU), the best of repeats: the traced work counts what each op writes, and an elementwise op reads one or two
    bytes for each it writes (a copy's read-and-write bandwidth would price it two to three times too fast)."""
    import torch

    n = BANDWIDTH_BYTES // 4
    a, b, c = torch.ones(n, device=device), torch.ones(n, device=device), torch.empty(n, device=device)
    return BANDWIDTH_BYTES / _best_seconds(lambda: torch.add(a, b, out=c), min_s, device)


def _best_per_op(chain: Any, min_s: float) -> float:
    """Seconds per op of ``chain`` (which runs and returns how many ops it dispatched): one warm-up call, then the
    fastest of the calls within ``min_s``."""
    chain()
    best, start, ops = float("inf"), time.perf_counter(), 1
    while time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        ops = chain()
        best = min(best, time.perf_counter() - t0)
    return best / ops


def seconds_per_view(min_s: float = 0.05) -> float:
    """The cost of one view op with autograd recording: a chain of transposes of a small tensor, forward and
    backward, the best of repeats per op."""
    import torch

    def chain() -> int:
        x = torch.ones(4, 4, requires_grad=True)
        y = x
        for _ in range(OP_CHAIN):
            y = y.t()
        y.sum().backward()
        return 2 * OP_CHAIN + 2

    return _best_per_op(chain, min_s)


def seconds_per_policed_op(min_s: float = 0.1) -> float:
    """:func:`seconds_per_op` with every op passing through a Python dispatch mode that asks a policy function, as
    selective activation checkpointing's does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Policy(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            _ = func in MATMULS  # a policy's question
            return func(*args, **(kwargs or {}))

    with Policy():
        return seconds_per_op(min_s)


def seconds_per_op(min_s: float = 0.1, device: Any = None) -> float:
    """The fixed cost of one aten op with autograd recording: a chain of multiplications of a tiny tensor on
    ``device`` (default the CPU), forward and backward, timed on the host's clock; the best of repeats per op
    dispatched. On a GPU that is the host's cost to dispatch and launch an op (its kernels, on eight numbers, take
    less and run behind it)."""
    import torch

    def chain() -> int:
        x = torch.ones(8, device=device, requires_grad=True)
        y = x
        for _ in range(OP_CHAIN):
            y = y * 1.0001
        y.sum().backward()
        return 2 * OP_CHAIN + 2  # each mul forward and backward, the sum and its backward

    return _best_per_op(chain, min_s)


LINK_SIZES = (1024, 4 * 2**20)  # bytes of the two calls of each collective that fit latency and bandwidth
CARD_LINK_SIZES = (1024, 64 * 2**20)  # between cards (NVLink moves 4 MiB in microseconds)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def link_buffers(n: int, device: Any = None) -> tuple[Any, Any]:
    """The tensors :func:`link_probe` moves between ``n`` ranks on ``device``: a whole one and a rank's part of
    it, at the largest size it times (made before it, so that a rank that cannot hold them fails before any
    collective starts)."""
    import torch

    part = (CARD_LINK_SIZES if _on_card(device) else LINK_SIZES)[1] // 4 // n
    return torch.ones(part * n, device=device), torch.ones(part, device=device)


def link_probe(group: Any = None, repeats: int = 5, device: Any = None,
               buffers: tuple[Any, Any] | None = None) -> dict[str, tuple[float, float]]:
    """Per collective (all-reduce, all-gather into a tensor, reduce-scatter of a tensor): (latency s, bandwidth
    bytes/s) of the process group's link, from calls at two sizes on every rank of ``group`` (a collective: every
    rank calls it), the slowest rank's, with tensors on ``device`` (default the CPU; on a GPU each call is timed
    until the card has finished it; ``buffers``: :func:`link_buffers`'s, made here if not given). Each collective's
    share of its bytes (2 (n-1)/n for an all-reduce, (n-1)/n for the others) is taken out, so the bandwidth is the
    link's. The bandwidth is the fastest calls' at the two sizes; on a CPU the latency is the small call's mean
    within a step (:func:`in_step_seconds`), the fixed cost each of a step's collectives pays, on a GPU the fastest
    call's."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    sizes = CARD_LINK_SIZES if _on_card(device) else LINK_SIZES
    whole, own = buffers or link_buffers(n, device)

    def call(kind: str, size: int) -> Any:
        part = own[:size // 4 // n]
        full = whole[:part.numel() * n]
        if kind == "all_reduce":
            return lambda: dist.all_reduce(full, group=group)
        if kind == "all_gather":
            return lambda: dist.all_gather_into_tensor(full, part, group=group)
        return lambda: dist.reduce_scatter_tensor(part, full, group=group)

    out: dict[str, tuple[float, float]] = {}
    for kind in COLLECTIVES:
        times = []
        for size in sizes:
            run = call(kind, size)
            run()
            best = float("inf")
            for _ in range(repeats):
                dist.barrier(group=group)
                best = min(best, _wall_seconds(run, device))
            times.append(best)
        share = (2 if kind == "all_reduce" else 1) * (n - 1) / n
        slope = max((times[1] - times[0]) / (sizes[1] - sizes[0]), 1e-15)
        bandwidth = share / slope
        small = times[0] if _on_card(device) else in_step_seconds(call(kind, sizes[0]), group)
        latency = max(0.0, small - share * sizes[0] / bandwidth)
        t = torch.tensor([latency, 1 / bandwidth], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # the slowest rank's view: every rank agrees
        out[kind] = (float(t[0]), 1 / float(t[1]))
    return out


IN_STEP_CALLS = 30  # small calls of each collective a CPU's link probe times between stretches of compute
IN_STEP_MATMULS = 4  # the stretch: this many 256 x 256 fp32 matmuls (about a millisecond on one core)


def in_step_seconds(call: Any, group: Any = None, calls: int = IN_STEP_CALLS, stretch: Any = None) -> float:
    """Mean seconds of a collective ``call()`` on a CPU made as a training step makes it: after a stretch of compute
    on every rank (``stretch()``; default :data:`IN_STEP_MATMULS` matmuls), which is not timed, not back to back.
    Where ranks share a machine's cores a call's wait there is several times the fastest back-to-back call's, on
    every rank at once (not one rank waiting for another's compute), and heavy-tailed: a step pays its mean. A
    collective: every rank of ``group`` calls it."""
    import torch
    import torch.distributed as dist

    if stretch is None:
        a = torch.ones(256, 256)

        def stretch() -> None:
            for _ in range(IN_STEP_MATMULS):
                a @ a

    total = 0.0
    dist.barrier(group=group)
    for _ in range(calls):
        stretch()
        total += _wall_seconds(call)
    return total / calls


def _widths(cfg: DictConfig) -> tuple[int, int]:
    """(model width, MLP width) of the run's model, from its config."""
    from costlab.models.hf_config import is_hf

    if is_hf(cfg):
        from transformers import AutoConfig

        from costlab.measure.traced import hf_source

        c = AutoConfig.from_pretrained(hf_source(cfg))
        width = int(getattr(c, "hidden_size", None) or c.n_embd)
        return width, int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * width)
    m = cfg.model
    if "n_layer" not in m:  # model=mlp: its window of embeddings into its hidden layer
        return int(m.context) * int(m.n_embd), int(m.hidden)
    from costlab.measure.memory import _gpt_config

    g = _gpt_config(cfg)
    return int(g.n_embd), int(g.hidden_dim)


def matmul_rate(m: int, k: int, n: int, dtype_name: str, min_s: float = 0.05, device: Any = None) -> float:
    """FLOP/s of a Linear's three matmuls in training, in ``dtype_name`` on ``device`` (default the CPU, with this
    process's threads): the forward's (m, k) @ (n, k)^T, the input's gradient (m, n) @ (n, k) and the weight's
    (m, n)^T @ (m, k), in the layouts ``F.linear`` and autograd use (the weight transposed, the gradient's
    reduction over the tokens); each the best of repeats."""
    import torch

    dtype = getattr(torch, dtype_name)
    x, w, g = (torch.randn(*shape, device=device).to(dtype) for shape in ((m, k), (n, k), (m, n)))
    seconds = sum(_best_seconds(lambda a=a, b=b: torch.mm(a, b), min_s / 3, device)
                  for a, b in ((x, w.t()), (g, w), (g.t(), x)))
    return 3 * 2 * m * k * n / seconds


def _run_shapes(cfg: DictConfig, world: int) -> tuple[int, int, int, int, str]:
    """(a micro-batch's tokens, width, MLP width, tensor-parallel degree, dtype) of the run's matmuls on one rank."""
    from costlab.parallelism.dims import parallel_dims

    t, p = cfg.trainer, cfg.parallelism
    dims = parallel_dims(p, world)
    micro = int(p.microbatches) if dims.pp_enabled else 1
    tokens = max(1, int(t.batch_size // dims.dp // t.grad_accum_steps // micro)) * int(cfg.model.block_size)
    width, hidden = _widths(cfg)
    return tokens, width, hidden, dims.tp, str(cfg.precision.get("autocast_dtype") or "float32")


def matmul_mix_rate(tokens: int, width: int, hidden: int, tp: int, dtype: str, device: Any = None) -> float:
    """FLOP/s of ``tokens`` through a layer's projections on ``device`` (default the CPU): attention's (width x
    width / tp) and the MLP's (width x hidden / tp), weighted as a layer does them."""
    attention, mlp = 4 * width * width, 2 * width * hidden  # per token: q, k, v, out; the MLP's two
    seconds = (attention / matmul_rate(tokens, width, max(1, width // tp), dtype, device=device)
               + mlp / matmul_rate(tokens, width, max(1, hidden // tp), dtype, device=device))
    return (attention + mlp) / seconds


LAYOUT_TOKENS = 8  # the layout probe's input: one row of this many tokens (fixed costs, not bytes of activations)
# the layout probe times each part of a small model's pass as often as fits in this (a DDP's wrapping is mostly its
# all-reduce's wait, heavy-tailed: the median of 5 moved 1.2-5.8 ms a step between probes of one 4-layer model, of
# 31 0.8-1.8 ms), up to MAX_REPEATS times
LAYOUT_BUDGET_S = 0.1
MAX_REPEATS = 31
LAYOUT_DEPTHS = (1, 3)  # the depths the layout probe builds; a layer's cost is their difference over the layers


def depth_seconds(cfg: DictConfig, world: int, build_optimizer: Any, wrapped: bool, rows: int = 1,
                  tokens: int = LAYOUT_TOKENS, repeats: int = 5, device: Any = None,
                  at_once: bool = True, calls: dict | None = None,
                  budget_s: float = 0.0, in_turn: bool = True) -> dict[int, tuple[float, float]]:
    """Per depth of ``LAYOUT_DEPTHS``: the seconds of one micro-batch's forward and backward and of a step's
    gradient clipping and optimizer step, the median of ``repeats`` (the measured tokens/s is a mean over steps,
    not their best), for the run's own model code at that depth on ``rows`` rows of ``tokens`` tokens (at most the
    block), under the run's checkpointing and autocast, uncompiled; ``wrapped``: laid out as the run lays it out
    (:func:`costlab.parallelism.apply.apply_parallelisms` on the run's mesh, in DDP where the run replicates), else
    plain on this rank; either way fine-tuned as the run fine-tunes it (LoRA's adapters, QLoRA's NF4 base). The
    rest as :func:`layouts_seconds`'s."""
    return layouts_seconds(cfg, world, build_optimizer, (wrapped,), rows, tokens, repeats, device, at_once, calls,
                           budget_s, in_turn)[0]


def layouts_seconds(cfg: DictConfig, world: int, build_optimizer: Any, layouts: tuple[bool, ...], rows: int = 1,
                    tokens: int = LAYOUT_TOKENS, repeats: int = 5, device: Any = None,
                    at_once: bool = True, calls: dict | None = None,
                    budget_s: float = 0.0, in_turn: bool = True) -> list[dict[int, tuple[float, float]]]:
    """:func:`depth_seconds` of each layout in ``layouts`` (True: wrapped, False: plain), every model built first
    and their timings taken in turn, round after round: a stretch where the host runs slow (a shared machine's
    neighbours) then weighs on every depth and layout alike, not on the one timed then, so a layer's cost (the
    depths' difference) and a layout's (wrapped less plain) hold against it. ``device``: where it runs (default the
    CPU); on a GPU each timing waits for the card's kernels. ``at_once``: the ranks start each timing together, as
    CPU ranks sharing a node's cores train (plain on a GPU, each rank has its own card: :func:`card_probes` times
    without waiting for its peers). ``build_optimizer``: the trainer's (:func:`optimizer_work`). ``calls``: a dict,
    filled per depth with the collectives (per kind: :func:`collective_kind`) that one more micro-batch's forward
    and backward and one more step of the wrapped layout issue, untimed. ``budget_s``: time each part as often as
    its warm-up says fits in that many seconds, at least ``repeats`` and at most :data:`MAX_REPEATS` times (the
    ranks agree on the count). ``in_turn=False``: each model's timings one after the other instead, as training
    runs one model step after step (where a level matters more than a difference: a model timed right after another
    reads more, 6-29 % for a stage at one row of 8 tokens on the 2-core EPYC). Wrapped, or ``at_once`` on a run
    of several ranks, a collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    from costlab.measure.memory import _with_depth
    from costlab.models.adapters import apply_finetune
    from costlab.models.gpt import build_model
    from costlab.models.loss import loss_fn
    from costlab.parallelism.apply import apply_parallelisms, build_mesh
    from costlab.parallelism.core import clip_grad_norm_
    from costlab.parallelism.ddp import apply_ddp
    from costlab.parallelism.dims import ParallelDims, parallel_dims

    device = torch.device(device or "cpu")
    low_precision = cfg.precision.get("autocast_dtype")  # as the trainer's autocast (costlab.precision)
    x = torch.zeros(rows, min(tokens, int(cfg.model.block_size)), dtype=torch.long, device=device)
    clip = float(cfg.trainer.grad_clip or 0.0)
    together = at_once and world > 1 and dist.is_available() and dist.is_initialized()
    run_dims = parallel_dims(cfg.parallelism, world)
    mesh = build_mesh(run_dims, device.type) if True in layouts else None

    def built(wrapped: bool, layers: int) -> tuple[Any, Any, Any]:
        """(the optimizer, one micro-batch's passes, a step's update) of the model at that depth and layout."""
        dims = run_dims if wrapped else ParallelDims(1, 1, 1, 1)
        shallow = _with_depth(cfg, layers)
        shallow.trainer.compile = False  # eager costs: a probe does not wait for a compiler
        torch.manual_seed(0)
        model = apply_finetune(build_model(shallow.model), shallow, shards=dims.dp_shard)  # LoRA's adapters, NF4
        apply_parallelisms(model, shallow, dims, mesh if wrapped else None, device)
        if dims.ddp_enabled:  # as the run wraps it (DDP combines with no other degree)
            group = mesh["dp_replicate"].get_group()
            model = apply_ddp(model, group, device, cfg.parallelism.get("bucket_cap_mb", 25))
            if dist.get_backend(group) == "fake":  # a plan's probe (:func:`local_layout`)
                model.register_comm_hook(group, _local_all_reduce)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, shallow)

        def passes() -> None:
            with torch.autocast(device.type, dtype=getattr(torch, low_precision or "bfloat16"),
                                enabled=bool(low_precision)):
                logits = model(x)
            loss_fn(logits, x).backward()

        def update() -> None:
            if clip:
                (clip_grad_norm_ if wrapped else torch.nn.utils.clip_grad_norm_)(params, clip)
            optimizer.step()

        passes()
        update()
        return optimizer, passes, update

    variants = {(wrapped, layers): built(wrapped, layers) for wrapped in layouts for layers in LAYOUT_DEPTHS}
    count = repeats
    if budget_s:  # a short pass is timed more often: its median then holds against the collectives' tail
        once = sum(_wall_seconds(passes, device) + _wall_seconds(update, device)  # warm now
                   for _, passes, update in variants.values()) / len(variants)
        count = min(MAX_REPEATS, max(repeats, math.ceil(budget_s / max(once, 1e-9))))
        if together:
            agreed = torch.tensor([count], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            count = int(agreed)
    times: dict[tuple[bool, int], tuple[list[float], list[float]]] = {key: ([], []) for key in variants}
    if in_turn:  # round after round, every model in each
        order = [key for _ in range(count) for key in variants]
    else:  # each model's timings one after the other
        order = [key for key in variants for _ in range(count)]
    for key in order:
        optimizer, passes, update = variants[key]
        optimizer.zero_grad(set_to_none=True)
        for i, part in enumerate((passes, update)):
            if together:
                dist.barrier()
            times[key][i].append(_wall_seconds(part, device))
    if calls is not None:  # once more, counted (a dispatch mode's Python would weigh on the timings)
        for (wrapped, layers), (optimizer, passes, update) in variants.items():
            if wrapped:
                optimizer.zero_grad(set_to_none=True)
                counted = []
                for part in (passes, update):
                    with _CollectiveCounter() as counter:
                        part()
                    counted.append(dict(counter.calls))
                calls[layers] = tuple(counted)
    return [{layers: (statistics.median(times[wrapped, layers][0]), statistics.median(times[wrapped, layers][1]))
             for layers in LAYOUT_DEPTHS} for wrapped in layouts]


def _local_all_reduce(group, bucket):  # noqa: ANN001, ANN202
    """DDP's default hook (each bucket divided by the group's size, then all-reduced) for a model laid out under
    PyTorch's fake process group, where the all-reduce's future holds no tensor for the reducer: the bucket, done.
    Unannotated: DDP compares a hook's annotations with its own types, and this module's annotations are strings."""
    import torch
    import torch.distributed as dist

    tensor = bucket.buffer().div_(group.size())
    dist.all_reduce(tensor, group=group)
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(tensor)
    return done


def per_layer(seconds: dict[int, tuple[float, float]]) -> tuple[float, float, float, float]:
    """(passes per layer, passes outside the layers, step per layer, step outside) from :func:`depth_seconds`'s
    figures: a layer's is the difference over the depths, the outside's what the shallowest has beyond its layers;
    none below 0."""
    (low, high), span = LAYOUT_DEPTHS, LAYOUT_DEPTHS[1] - LAYOUT_DEPTHS[0]
    layer, step_layer = (max(0.0, (seconds[high][i] - seconds[low][i]) / span) for i in (0, 1))
    outside, step_outside = (max(0.0, seconds[low][i] - low * per) for i, per in ((0, layer), (1, step_layer)))
    return layer, outside, step_layer, step_outside


def layout_seconds(cfg: DictConfig, world: int, build_optimizer: Any,
                   calls: dict | None = None) -> tuple[float, float, float]:
    """The seconds the run's own tensor-parallel, FSDP or DDP wrapping adds: per layer and outside the layers of one
    micro-batch's forward and backward, and to a step's gradient clipping and optimizer step (its sharded
    parameters are DTensors) for the run's depth (a pipeline stage's share of it): :func:`depth_seconds` wrapped
    less plain, timed in turn (:func:`layouts_seconds`), on one row of ``LAYOUT_TOKENS`` tokens. That holds FSDP2's
    hooks, its copies in and out and its gathers and reduce-scatters of the real weights, DTensor's Python per op
    and the collectives' fixed costs, and DDP's gradient hooks, bucket copies and bucketed all-reduces of the real
    gradients; tensor parallel's activation bytes, which grow with the batch, are left to the link model.
    ``calls``: as :func:`depth_seconds`'s, of the wrapped model (:func:`layout_calls`). A collective: every rank
    calls it."""
    from costlab.parallelism.dims import parallel_dims

    wrapped, plain = layouts_seconds(cfg, world, build_optimizer, (True, False), calls=calls, budget_s=LAYOUT_BUDGET_S)
    extra = {d: tuple(w - p for w, p in zip(wrapped[d], plain[d], strict=True)) for d in LAYOUT_DEPTHS}
    layer, outside, step_layer, step_outside = per_layer(extra)
    dims = parallel_dims(cfg.parallelism, world)
    if not (dims.fsdp_enabled or dims.tp_enabled):  # DDP steps the same plain tensors: its difference is noise
        return layer, outside, 0.0
    return layer, outside, stage_layers(cfg, world) * step_layer + step_outside


def stage_layers(cfg: DictConfig, world: int) -> float:
    """The layers one rank's stage holds: the run's depth, a pipeline stage's share of it (0 for a model whose
    depth is not known)."""
    from costlab.measure.memory import _depth
    from costlab.parallelism.dims import parallel_dims

    return (_depth(cfg) or 0) / parallel_dims(cfg.parallelism, world).pp


def layout_calls(cfg: DictConfig, world: int, counted: dict) -> dict[str, tuple[float, float, float]]:
    """Per collective (:func:`collective_kind`): the calls the run's layout issues per layer and outside the layers
    of one micro-batch's forward and backward, and per step (its clipping and optimizer step, at the run's depth or
    a pipeline stage's share of it), from what :func:`depth_seconds` counted at its two depths (``counted``)."""
    depth = stage_layers(cfg, world)
    kinds = sorted({kind for passes, step in counted.values() for kind in (*passes, *step)})
    out = {}
    for kind in kinds:
        layer, outside, step_layer, step_outside = per_layer(
            {d: (passes.get(kind, 0), step.get(kind, 0)) for d, (passes, step) in counted.items()})
        out[kind] = (layer, outside, depth * step_layer + step_outside)
    return out


def schedule_seconds(cfg: DictConfig, env: Any, build_optimizer: Any, repeats: int = 5) -> float:
    """What one step of the run's own pipeline schedule adds beyond its stages' compute and bubble: the run's model
    at its depth, staged, scheduled and wrapped as the run does it
    (:class:`costlab.parallelism.pp.PipelineParallel`), runs one schedule step on one row of ``LAYOUT_TOKENS``
    tokens per micro-batch (the median of ``repeats``), less what the time model puts there for that work: (micro-
    batches + the bubble's slots) x one such micro-batch through a stage, timed plain (:func:`depth_seconds`). That
    holds the schedule's Python per action, its sends' and receives' fixed costs, the loss per micro-batch, the
    tied weight's all-reduce and a stage's FSDP or tensor-parallel wrapping per micro-batch; the activations'
    bytes, which grow with the batch, are left to the link model. ``env``: the rank's
    :class:`costlab.parallelism.core.DistEnv`. A collective: every rank calls it. Under PyTorch's fake process
    group (a plan's probe, :func:`local_schedule`) the rank runs its stages without its peers
    (:func:`costlab.parallelism.pp.lone_stages`): it waits for none of them, and what the model puts there is its
    micro-batches alone, without the bubble's slots."""
    import torch
    import torch.distributed as dist

    from costlab.models.gpt import build_model
    from costlab.parallelism.apply import build_mesh
    from costlab.parallelism.dims import parallel_dims
    from costlab.parallelism.pp import PipelineParallel, PipelineStage, lone_stages

    world = env.world_size
    dims = parallel_dims(cfg.parallelism, world)
    p = cfg.parallelism
    micro = int(p.microbatches)
    v = int(p.stages_per_rank) if p.schedule == "interleaved_1f1b" else 1
    probe = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    probe.trainer.compile = False  # eager costs, as every probe
    probe.trainer.grad_accum_steps = 1  # one schedule step
    tokens = min(LAYOUT_TOKENS, int(cfg.model.block_size))
    x = torch.zeros(micro, tokens, dtype=torch.long)  # one row per micro-batch
    torch.manual_seed(0)
    model = build_model(probe.model)
    lone = dist.get_backend() == "fake"
    stage = lone_stages(model, probe, dims.pp * v, x[:1]) if lone else PipelineStage
    pipeline = PipelineParallel(model, probe, env, dims, build_mesh(dims, env.device.type), stage)
    times = []
    for i in range(repeats + 2):  # two warm-up steps: the first infers the stages' shapes
        for part in pipeline.parts.values():
            part.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        pipeline.forward_backward(x, x, probe, None)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    # each depth timed in a burst, as the schedule runs its stages: a stage timed in turn with another model reads
    # more, and taking that off made the pipelines' predictions too fast
    layer, outside, _, _ = per_layer(depth_seconds(cfg, world, build_optimizer, False, 1, tokens, in_turn=False))
    per_stage = stage_layers(cfg, world) * layer + outside  # as :func:`predict_step` prices a stage
    return max(0.0, statistics.median(times) - (micro + (0 if lone else (dims.pp - 1) / v)) * per_stage)


@dataclass
class RankProbes:
    """What every rank measured at once (the slowest rank's figures): the run's matmul shapes, ops, views and
    memory bandwidth under the run's own contention (its ranks share the node's cores and memory), the link
    between them, and what FSDP's and tensor parallel's wrapping adds where the layout uses them."""

    matmul_flops: float
    op_s: float
    view_s: float
    bytes_per_s: float
    link: dict[str, tuple[float, float]] | None
    policy_op_s: float = 0.0
    layout_layer_s: float = 0.0
    layout_outside_s: float = 0.0
    layout_step_s: float = 0.0
    model: ModelProbe | None = None
    schedule_s: float = 0.0
    layout_peers: bool = True  # the layout's probe ran beside its peers (a plan's: without them)
    layout_calls: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # as :class:`Rates`'s
    layout_probed: bool = False  # the layout's wrapping and the pipeline's schedule were probed (their figures may
    schedule_probed: bool = False  # be 0: see :class:`Rates`)


def probe_ranks(cfg: DictConfig, env: Any, build_optimizer: Any) -> RankProbes | None:
    """:class:`RankProbes` of the run's ranks (on a GPU run, :func:`card_probes`); ``env``: the rank's
    :class:`costlab.parallelism.core.DistEnv`. A collective, every rank calls it."""
    if env.device.type == "cuda":
        return card_probes(cfg, env, build_optimizer)
    world = env.world_size
    import torch.distributed as dist

    from costlab.parallelism.dims import parallel_dims

    if world > 1:
        dist.barrier()
    dims = parallel_dims(cfg.parallelism, world)
    selective = cfg.trainer.get("activation_checkpointing", "none") == "selective"
    times = rank_times(selective, *_run_shapes(cfg, world))
    from costlab.measure.memory import _depth

    probed_model = _depth(cfg) is not None
    pipelined = world > 1 and dims.pp_enabled and probed_model
    # a pipeline stage's wrapping per micro-batch is in the schedule's probe; a sharded stage's optimizer step is not
    sharded = dims.fsdp_enabled or dims.tp_enabled
    wrapped = world > 1 and probed_model and (sharded or (dims.ddp_enabled and not pipelined))
    layout = layout_seconds(cfg, world, build_optimizer) if wrapped else (0.0, 0.0, 0.0)
    if pipelined:
        layout = (0.0, 0.0, layout[2])
    times += [*layout, schedule_seconds(cfg, env, build_optimizer) if pipelined else 0.0]
    if probed_model:
        times += plain_model_seconds(cfg, world, build_optimizer)
    w = slowest_rank(times, (5, 9) if probed_model else (5,), stage_layers(cfg, world))
    link = link_probe() if world > 1 else None
    model = ModelProbe(w[9], w[10], 1 / w[11]) if probed_model else None
    return RankProbes(1 / w[0], w[1], w[2], 1 / w[3], link, *w[4:8], model=model, schedule_s=w[8],
                      layout_probed=wrapped, schedule_probed=pipelined)


def slowest_rank(times: list[float], pairs: tuple[int, ...], layers: float, device: Any = None) -> list[float]:
    """The slowest rank's ``times``: each the largest over the ranks, but for each index ``i`` of ``pairs`` the
    seconds per layer and outside the layers ``times[i]``, ``times[i + 1]`` of one rank, the one whose ``layers`` x
    per layer + outside is the largest (:func:`slowest_pairs`). A collective where a process group of several ranks
    is up: every rank calls it, and every rank gets the same figures."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in times]
    mine = torch.tensor(times, dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return slowest_pairs([[float(v) for v in rank] for rank in every], pairs, layers)


def slowest_pairs(ranks: list[list[float]], pairs: tuple[int, ...], layers: float) -> list[float]:
    """Each figure the largest of ``ranks``' (one list of figures per rank), but the two of each pair ``(i, i + 1)``
    of ``pairs`` (seconds per layer, seconds outside the layers) both the rank's whose ``layers`` x per layer +
    outside is the largest. A probe splits its time between a layer and the outside by the difference of two
    depths, which moves from rank to rank: each part's own largest may come from different ranks, and their sum is
    then more than any rank's."""
    out = [max(column) for column in zip(*ranks, strict=True)]
    for i in pairs:
        slowest = max(ranks, key=lambda figures: layers * figures[i] + figures[i + 1])
        out[i], out[i + 1] = slowest[i], slowest[i + 1]
    return out


def plain_model_seconds(cfg: DictConfig, world: int, build_optimizer: Any, device: Any = None,
                        at_once: bool = True) -> list[float]:
    """[seconds per layer, seconds outside the layers, seconds per matmul FLOP] of the run's own model plain on one
    rank's micro-batch (:func:`depth_seconds` at two depths, :func:`per_layer`; its matmuls' shapes there without
    tensor parallel's split): what :class:`ModelProbe` holds. ``device``, ``at_once``: as :func:`depth_seconds`."""
    tokens, width, hidden, _, dtype = _run_shapes(cfg, world)
    block = int(cfg.model.block_size)
    layer, outside, _, _ = per_layer(depth_seconds(cfg, world, build_optimizer, False, tokens // block, block,
                                                   device=device, at_once=at_once))
    return [layer, outside, 1 / matmul_mix_rate(tokens, width, hidden, 1, dtype, device)]


def card_probes(cfg: DictConfig, env: Any, build_optimizer: Any) -> RankProbes | None:
    """:class:`RankProbes` of a GPU run, each rank on its own card, the slowest rank's: the run's matmul shapes in
    its dtype, the host's seconds to dispatch and launch one small autograd op, the bytes a large add writes per
    second, and the run's own model plain on the run's micro-batch at two depths (:func:`depth_seconds`), each
    timing waiting for the card's kernels; on a run of several cards in one node, each collective at two sizes
    between them (:func:`link_probe`; across nodes the collectives keep the hardware option's figures). No layout's
    wrapping or schedule. What it allocates is freed before it returns (the worker keeps the run's peak
    memory from before it). A probe that fails on any rank (out of memory beside the trained model) costs the run
    its probes only: every rank then returns None, and the prediction is the plan's (:func:`gpu_rates`). A
    collective: every rank calls it once, failed or not."""
    import gc
    import sys

    from costlab.measure.memory import _depth

    device, world = env.device, env.world_size
    probed_model = _depth(cfg) is not None
    one_node = 1 < world == env.local_world_size  # the same on every rank
    try:
        tokens, width, hidden, tp, dtype = _run_shapes(cfg, world)
        times = [1 / matmul_mix_rate(tokens, width, hidden, tp, dtype, device), seconds_per_op(device=device),
                 1 / memory_bandwidth(device=device)]
        if probed_model:
            times += plain_model_seconds(cfg, world, build_optimizer, device, at_once=False)
        buffers = link_buffers(world, device) if one_node else None
        failed = 0.0
    except Exception as e:  # noqa: BLE001 - a probe that cannot run costs the prediction its probes, not the run
        print(f"costlab: rank {env.rank}: the card's time probes failed ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); the time prediction uses the plan's rates",
              file=sys.stderr, flush=True)
        times, failed, buffers = [0.0] * (6 if probed_model else 3), 1.0, None
    gc.collect()  # its models' cached blocks go back to the card in the worker (costlab.measure.metrics.restart_peaks)
    w = slowest_rank([*times, failed], (3,) if probed_model else (), stage_layers(cfg, world), device)
    if w[-1]:
        return None
    link = link_probe(device=device, buffers=buffers) if one_node else None
    model = ModelProbe(w[3], w[4], 1 / w[5]) if probed_model else None
    return RankProbes(1 / w[0], w[1], 0.0, 1 / w[2], link, model=model)


def local_probes(cfg: DictConfig, world: int, build_optimizer: Any = None) -> RankProbes:
    """:class:`RankProbes` of one process, for a plan on this CPU: the run's matmul shapes with this process's
    share of the cores (``trainer.nproc_per_node`` ranks share them; at most :data:`PLAN_MATMUL_TOKENS` of a
    micro-batch's tokens), ops, views and a copy, timed while companion processes time the same as the node's other
    ranks would (:func:`beside_peers`); no link (no peers: :func:`plan_cpu_rates` takes the one runs kept). With
    ``build_optimizer`` (the trainer's) also the run's own model plain on one rank's micro-batch at two depths
    (:func:`local_model`), as a run probes it (a small model's step is its ops' fixed costs more than its matmuls),
    and FSDP's, tensor parallel's or DDP's wrapping as rank 0 of the layout runs it under a fake process group
    (:func:`local_layout`; a pipeline's, its stages' optimizer step alone), and a pipeline's schedule as the ranks
    of its first and last stages run it there (:func:`local_schedule`)."""
    from costlab.measure.memory import _depth
    from costlab.parallelism.dims import parallel_dims

    share = local_share(cfg)
    times, _ = _plan_rank_times(cfg, world)
    model = local_model(cfg, world, share, build_optimizer) if build_optimizer and _depth(cfg) is not None else None
    dims = parallel_dims(cfg.parallelism, world)
    # as :func:`probe_ranks`: a pipeline stage's wrapping per micro-batch is in the schedule's probe
    sharded = dims.fsdp_enabled or dims.tp_enabled
    wrapped = model is not None and (sharded or (dims.ddp_enabled and not dims.pp_enabled))
    layout = local_layout(cfg, world, share, build_optimizer) if wrapped else None
    layer_s, outside_s, step_s, calls = layout or (0.0, 0.0, 0.0, {})
    if dims.pp_enabled:  # its stages' collectives are in its schedule's probe, uncounted (the link model's)
        layer_s, outside_s, calls = 0.0, 0.0, {}
    schedule = local_schedule(cfg, world, share, build_optimizer) if model is not None and dims.pp_enabled else None
    return RankProbes(1 / times[0], times[1], times[2], 1 / times[3], None,
                      policy_op_s=times[4], layout_layer_s=layer_s, layout_outside_s=outside_s,
                      layout_step_s=step_s, layout_calls=dict(calls), model=model, layout_peers=False,
                      layout_probed=layout is not None,
                      schedule_s=schedule or 0.0, schedule_probed=schedule is not None)


PLAN_MATMUL_TOKENS = 2048  # a plan times its matmul shapes on at most this many tokens (the rate has levelled off)


def _plan_rank_times(cfg: DictConfig, world: int) -> tuple[list[float], int]:
    """A plan's :func:`rank_times` on this CPU beside its node's other ranks (:func:`beside_peers`), and how many
    companion processes timed beside it."""
    selective = cfg.trainer.get("activation_checkpointing", "none") == "selective"
    tokens, *shapes = _run_shapes(cfg, world)
    threads, peers = local_share(cfg), local_peers(cfg, world)
    matmul, timed = _local_times(threads, peers, "matmul_seconds", min(tokens, PLAN_MATMUL_TOKENS), *shapes)
    fixed, _ = _local_times(threads, peers, "fixed_times", selective)  # the same for every candidate of a search
    return matmul + fixed, timed


def local_share(cfg: DictConfig) -> int:
    """The threads one rank of the run has on this machine: its cores shared by ``trainer.nproc_per_node`` ranks."""
    import os

    return max(1, (os.cpu_count() or 1) // int(cfg.trainer.nproc_per_node))


def plan_cpu_rates(cfg: DictConfig, world: int, build_optimizer: Any = None) -> Rates:
    """A plan's rates on this CPU: :func:`local_probes` (with the run's model, and its layout's wrapping, where
    ``build_optimizer`` is given), their source saying they were probed in this one process, and the link that runs
    of ``world`` ranks here kept (:func:`cached_link`), where one did."""
    import os

    probes = local_probes(cfg, world, build_optimizer)
    companions = _plan_rank_times(cfg, world)[1]
    where = f"in this one process with {local_share(cfg)} of this machine's {os.cpu_count()} cores" + (
        f" (its rates timed while {companions} companion process{'es' if companions > 1 else ''} timed the same, as "
        "the node's other ranks would, the slowest's figures)" if companions else "")
    rates = cpu_rates(cfg, probes, where)
    kept = cached_link(cfg, world)
    if kept:
        rates.link = kept[0]
        rates.source += f"; the link the median of the probes of {kept[1]} earlier runs of {world} ranks here"
    return rates


def _link_cache(cfg: DictConfig) -> tuple[Any, Any]:
    """(the file a CPU's probes are kept in, or None; this CPU)."""
    from pathlib import Path

    from costlab.measure.machine import cpu_info

    cache = cfg.hardware.get("probe_cache")
    return (Path(cache) if cache else None), cpu_info()


def cached_link(cfg: DictConfig, world: int) -> tuple[dict[str, tuple[float, float]], int] | None:
    """The link between ``world`` ranks on this machine that earlier runs probed and kept (the median of the last
    few, and how many: :func:`costlab.measure.probes.cached_link`), for a plan of one node; None where none did, or
    the plan spans nodes (no run here crosses their network)."""
    from costlab.measure.probes import cached_link as kept

    if world <= 1 or int(cfg.trainer.nnodes) > 1:
        return None
    return kept(*_link_cache(cfg), world)


def keep_link(cfg: DictConfig, world: int, link: dict[str, tuple[float, float]] | None) -> None:
    """Keep a CPU run's link probe (:func:`link_probe`) of ``world`` ranks in one node beside the CPU's peak, for
    the plans that follow (:func:`cached_link`)."""
    from costlab.measure.probes import remember_link

    if link and int(cfg.trainer.nnodes) == 1 and cfg.trainer.device == "cpu":
        remember_link(*_link_cache(cfg), world, link)


def plan_gaps(cfg: DictConfig, world: int, rates: Rates) -> list[str]:
    """What a plan on this CPU of ``world`` ranks could not price, or priced without the layout's peers, and why."""
    from costlab.parallelism.dims import parallel_dims

    if world <= 1:
        return []
    dims = parallel_dims(cfg.parallelism, world)
    gaps = []
    if not rates.link:
        gaps.append("collectives not priced: " + (
            "a plan has no peers, and no run here crosses the network between nodes"
            if int(cfg.trainer.nnodes) > 1 else
            f"no run of {world} ranks on this machine has probed its link yet (one that does keeps it in "
            "hardware.probe_cache)"))
    if dims.pp_enabled and rates.schedule_probed:
        gaps.append("the pipeline's schedule probed as the ranks of its first and last stages run it, without their "
                    "peers: their waiting for one another is not priced (a run of the layout probes it)")
    elif dims.pp_enabled and rates.model:  # its schedule's probe failed
        gaps.append("the pipeline schedule's fixed costs not priced: its probe under a fake process group failed "
                    "here (the warning on stderr says why)")
    elif dims.pp_enabled:
        gaps.append(f"the pipeline schedule's fixed costs not priced: probed only for a model whose step is under "
                    f"{MODEL_PROBE_S} s and that fits this machine")
    elif rates.layout_probed:
        gaps.append("the layout's wrapping probed as its rank 0 runs it, without its peers: its collectives counted "
                    "there, each priced at the link's latency within a step that runs kept; the model and its wrapping "
                    "timed alone, without the ranks' contention for the cores (a run of the layout probes it)")
    elif rates.model and (dims.fsdp_enabled or dims.tp_enabled or dims.ddp_enabled):  # its wrapping's probe failed
        gaps.append("the layout's wrapping not priced: its probe under a fake process group failed here (the warning "
                    "on stderr says why)")
    elif dims.fsdp_enabled or dims.tp_enabled or dims.ddp_enabled:
        gaps.append(f"the layout's wrapping not priced (DDP's: its all-reduce alone): probed only for a model whose "
                    f"step is under {MODEL_PROBE_S} s and that fits this machine")
    return gaps


MODEL_PROBE_S = 1.0  # a CPU plan probes the run's own model (and its layout) where its step is predicted under this


@dataclass(frozen=True)
class _ModelProbeAsk:
    """What :func:`local_model` asks for: hashed and compared on ``key`` alone (its config and optimizer ride along)."""

    key: tuple
    threads: int = field(compare=False, hash=False)  # part of ``key``
    cfg: Any = field(compare=False, hash=False)
    world: int = field(compare=False, hash=False)
    build_optimizer: Any = field(compare=False, hash=False)


def local_model(cfg: DictConfig, world: int, threads: int, build_optimizer: Any) -> ModelProbe:
    """:class:`ModelProbe` of the run's model plain on one rank's micro-batch with ``threads`` threads, in this
    process (:func:`depth_seconds`, no peers), once per process for each model, micro-batch, precision, fine-tune,
    optimizer and checkpointing (a search asks for every candidate; the layout does not change a plain model)."""
    key = _probe_key(cfg, threads, _run_shapes(cfg, world)[0])
    return _probe_model(_ModelProbeAsk(key, threads, cfg, world, build_optimizer))


def _probe_key(cfg: DictConfig, *what: Any, groups: tuple[str, ...] = ()) -> tuple:
    """What a probe of the run's own model depends on: ``what`` (its threads, micro-batch...), the model, precision,
    fine-tune and optimizer options and ``groups``, checkpointing and clipping."""
    nodes = {k: cfg.get(k) for k in ("model", "precision", "finetune", "optimizer", *groups)}
    return (*what, json.dumps(OmegaConf.to_container(OmegaConf.create(nodes), resolve=True), sort_keys=True),
            str(cfg.trainer.get("activation_checkpointing", "none")), float(cfg.trainer.grad_clip or 0.0))


@functools.lru_cache(maxsize=64)
def _probe_model(ask: _ModelProbeAsk) -> ModelProbe:
    layer, outside, per_flop = _with_threads(ask.threads, lambda: plain_model_seconds(
        ask.cfg, ask.world, ask.build_optimizer, at_once=False))
    return ModelProbe(layer, outside, 1 / per_flop)


def local_layout(cfg: DictConfig, world: int, threads: int,
                 build_optimizer: Any) -> tuple[float, float, float, dict[str, tuple[float, float, float]]] | None:
    """:func:`layout_seconds` of the layout's FSDP, tensor-parallel or DDP wrapping as its rank 0 runs it with
    ``threads`` threads, in this process under PyTorch's fake process group (:func:`fake_group`: real shards and
    splits, each collective local; DDP's hooks and bucket copies, its all-reduce local: :func:`_local_all_reduce`),
    and the collectives it issues (:func:`layout_calls`), once per process for each layout, model, precision,
    fine-tune, optimizer and checkpointing (it runs on one short row, whatever the micro-batch); None, said on
    stderr, where it cannot run here."""
    return _lone_probe("the layout's wrapping", _probe_layout, cfg, world, threads, build_optimizer)


@functools.lru_cache(maxsize=64)
def _probe_layout(ask: _ModelProbeAsk) -> tuple[float, float, float, dict[str, tuple[float, float, float]]]:
    from costlab.parallelism.apply import fake_group

    counted: dict = {}
    with fake_group(0, ask.world):
        seconds = _with_threads(ask.threads, lambda: layout_seconds(ask.cfg, ask.world, ask.build_optimizer,
                                                                     counted))
    return (*seconds, layout_calls(ask.cfg, ask.world, counted))


def local_schedule(cfg: DictConfig, world: int, threads: int, build_optimizer: Any) -> float | None:
    """:func:`schedule_seconds` of the layout's pipeline schedule as the ranks of its first and of its last stage
    each run it alone with ``threads`` threads, the larger (the first embeds, the last holds the head and the loss),
    in this process under PyTorch's fake process group (its stages' shapes given, not exchanged:
    :func:`costlab.parallelism.pp.lone_stages`; each collective and send local, each receive's buffer as it was),
    once per process for each layout, model, precision, fine-tune, optimizer and checkpointing (on one short row per
    micro-batch, whatever the batch); None, said on stderr, where it cannot run here."""
    return _lone_probe("the pipeline's schedule", _probe_schedule, cfg, world, threads, build_optimizer)


def _lone_probe(what: str, probe: Any, cfg: DictConfig, world: int, threads: int, build_optimizer: Any) -> Any:
    """``probe`` of the layout (cached per layout, model, precision, fine-tune, optimizer and checkpointing), or
    None where it cannot run here under the fake process group: that costs the plan ``what`` alone, and stderr
    says why."""
    key = _probe_key(cfg, threads, world, groups=("parallelism",))
    try:
        return probe(_ModelProbeAsk(key, threads, cfg, world, build_optimizer))
    except Exception as e:  # noqa: BLE001 - a probe the fake group cannot run costs the plan that part only
        import sys

        why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        print(f"costlab: plan: {what} could not be probed here ({type(e).__name__}: {why}); it is not priced",
              file=sys.stderr, flush=True)
        return None


@functools.lru_cache(maxsize=64)
def _probe_schedule(ask: _ModelProbeAsk) -> float:
    import torch

    from costlab.parallelism.apply import fake_group
    from costlab.parallelism.core import DistEnv
    from costlab.parallelism.dims import parallel_dims

    dims = parallel_dims(ask.cfg.parallelism, ask.world)
    seconds = []
    for pp_rank in sorted({0, dims.pp - 1}):  # the mesh's outermost dimension: the other degrees' rank 0 of it
        rank = pp_rank * (ask.world // dims.pp)
        env = DistEnv(rank, rank, ask.world, ask.world, torch.device("cpu"))
        with fake_group(rank, ask.world):
            seconds.append(_with_threads(ask.threads, functools.partial(schedule_seconds, ask.cfg, env,
                                                                        ask.build_optimizer)))
    return max(seconds)


def _with_threads(threads: int, probe: Any) -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return probe()
    finally:
        torch.set_num_threads(before)


def rank_times(selective: bool, tokens: int, width: int, hidden: int, tp: int, dtype: str) -> list[float]:
    """A CPU rank's rates as seconds: per FLOP of the run's matmul shapes (:func:`matmul_mix_rate`), per op, per
    view, per byte written (:func:`memory_bandwidth`), and per op under selective checkpointing's policy (0 without
    ``selective``): what :func:`probe_ranks` times on every rank at once, and a plan's companions beside it."""
    return matmul_seconds(tokens, width, hidden, tp, dtype) + fixed_times(selective)


def matmul_seconds(tokens: int, width: int, hidden: int, tp: int, dtype: str) -> list[float]:
    """[seconds per FLOP of the run's matmul shapes (:func:`matmul_mix_rate`)]: :func:`rank_times`' first."""
    return [1 / matmul_mix_rate(tokens, width, hidden, tp, dtype)]


def fixed_times(selective: bool) -> list[float]:
    """:func:`rank_times` less the matmuls: seconds per op, per view, per byte written, per policed op (or 0)."""
    return [seconds_per_op(), seconds_per_view(), 1 / memory_bandwidth(),
            seconds_per_policed_op() if selective else 0.0]


COMPANION_PROBES = ("matmul_seconds", "fixed_times")  # what a plan's companion times, by name


@functools.lru_cache(maxsize=64)
def _local_times(threads: int, peers: int, probe: str, *args: Any) -> tuple[list[float], int]:
    """:func:`beside_peers` of one of :data:`COMPANION_PROBES`, once per process (a search asks for every
    candidate)."""
    return beside_peers(peers, threads, probe, *args)


def local_peers(cfg: DictConfig, world: int) -> int:
    """The ranks that would share this machine's cores with one rank of the plan: the others of its node."""
    return max(0, min(int(cfg.trainer.nproc_per_node), world) - 1)


COMPANION_START_S = 120.0  # a plan's companion process has this long to import torch, and to answer


def companion_command() -> list[str]:
    """The command line of a plan's companion process (:func:`companion`)."""
    import sys

    return [sys.executable, "-c", "from costlab.measure.steptime import companion; companion()"]


def beside_peers(peers: int, threads: int, probe: str, *args: Any) -> tuple[list[float], int]:
    """(``probe`` (one of :data:`COMPANION_PROBES`) of ``args`` with ``threads`` threads, timed in this process
    while ``peers`` companion processes (:func:`companions`) time the same at once, as a run's ranks do on the
    cores they share, each figure the slowest process's; how many companions timed). A plan has no peers of its
    own, and they slow one another: two processes dispatching ops at once on the 2-core EPYC read 3.6-6.9 us per
    op, alone 3.5-3.6. Where a companion cannot start or answer, this process's figures alone (a warning on
    stderr says why)."""
    import json
    import sys

    def mine() -> list[float]:
        return _with_threads(threads, lambda: _companion_probe(probe)(*args))

    if peers <= 0:
        return mine(), 0
    try:
        rows = at_once(companions(threads, peers), json.dumps([threads, probe, *args]), mine)
        if not all(isinstance(row, list) and len(row) == len(rows[0]) for row in rows):
            raise RuntimeError(f"a companion process answered {rows[1:]}")
        return [max(column) for column in zip(*rows, strict=True)], peers
    except (OSError, RuntimeError, ValueError) as e:
        companions.cache_clear()  # the next plan starts new ones (these stop at exit)
        print(f"costlab: warning: the plan's rates timed without companions ({e})", file=sys.stderr, flush=True)
        return mine(), 0


@functools.lru_cache(maxsize=4)
def companions(threads: int, peers: int) -> tuple[Any, ...]:
    """``peers`` companion processes (:func:`companion`, ``threads`` threads each), started once per process (a
    search plans many candidates) and stopped at its exit; each has imported torch and waits for a request."""
    import atexit

    procs = start_companions(companion_command(), peers, {"OMP_NUM_THREADS": str(threads)})
    atexit.register(stop_companions, procs)
    return procs


def start_companions(command: list[str], peers: int, env: dict[str, str] | None = None) -> tuple[Any, ...]:
    """``peers`` processes of ``command`` (``env`` added to this process's, the folder that holds costlab on their
    path), each having written ``ready``; RuntimeError (none left running) where one exits first or is silent for
    :data:`COMPANION_START_S`."""
    import os
    import subprocess
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2])
    full = {**os.environ, **(env or {}),
            "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    procs: list[Any] = []
    try:
        for _ in range(peers):
            procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full))
        for proc in procs:
            if _answer(proc) != "ready":
                raise RuntimeError(f"a companion process exited with code {proc.wait()} before timing")
    except BaseException:
        stop_companions(tuple(procs))
        raise
    return tuple(procs)


def stop_companions(procs: tuple[Any, ...]) -> None:
    """Closes each companion's input (it exits), and kills one that has not within a few seconds."""
    import subprocess

    for proc in procs:
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()


def at_once(procs: tuple[Any, ...], request: str, mine: Any) -> list[Any]:
    """[``mine()``, then each companion's answer to ``request``]: writes the request (one line) to each and runs
    ``mine`` here while they work, then reads each one's answer, a JSON line. RuntimeError where one closed its
    output or is silent for :data:`COMPANION_START_S`."""
    import json

    for proc in procs:
        proc.stdin.write(request + "\n")
        proc.stdin.flush()
    rows = [mine()]
    return rows + [json.loads(_answer(proc) or "null") for proc in procs]


def _answer(proc: Any) -> str:
    """The next line ``proc`` writes, stripped ("" once it closed its output); RuntimeError after
    :data:`COMPANION_START_S` of silence."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(COMPANION_START_S):
            raise RuntimeError(f"a companion process was silent for {COMPANION_START_S:.0f} s")
    return proc.stdout.readline().strip()


def _companion_probe(name: str) -> Any:
    """The probe of :data:`COMPANION_PROBES` named ``name`` (looked up when asked for)."""
    import sys

    if name not in COMPANION_PROBES:
        raise ValueError(f"{name!r} is not one of {COMPANION_PROBES}")
    return getattr(sys.modules[__name__], name)


def companion() -> None:
    """A plan's companion process (:func:`beside_peers`): writes ``ready`` once torch is imported, then for each
    request line (a JSON list: threads, one of :data:`COMPANION_PROBES`, its arguments) times it and writes its
    figures as a JSON list, until its input closes."""
    import json
    import sys

    print("ready", flush=True)
    for line in sys.stdin:
        threads, probe, *args = json.loads(line)
        print(json.dumps(_with_threads(threads, functools.partial(_companion_probe(probe), *args))), flush=True)


def cpu_rates(cfg: DictConfig, probes: RankProbes, where: str = "on every rank at once") -> Rates:
    """The rates of one rank of a CPU run: what the ranks measured at once (:func:`probe_ranks`); a plan's, what
    this one process measured (:func:`local_probes`), ``where`` saying so."""
    return Rates(probes.matmul_flops, probes.bytes_per_s, probes.op_s, probes.view_s, probes.link or {},
                 f"probes {where}: the run's matmul shapes, op and view chains, a large add"
                 + (", each collective at two sizes" if probes.link else "")
                 + (", ops under a dispatch-mode policy" if probes.policy_op_s else "")
                 + ((", the run's model wrapped as it runs and plain" if probes.layout_peers else
                     ", the run's model wrapped as its rank 0 runs it and plain, under a fake process group (the "
                     "layout's hooks, copies and DTensor's Python; its collectives counted, not timed)")
                    if probes.layout_probed else "")
                + ((", the run's pipeline schedule on one short row per micro-batch" if probes.layout_peers else
                    ", the run's pipeline schedule as the ranks of its first and last stages each run it alone, on "
                    "one short row per micro-batch, under a fake process group (its Python per action, the loss "
                    "and a stage's wrapping, not its sends)") if probes.schedule_probed else "")
                + (", the run's model plain at two depths on its micro-batch" if probes.model else ""),
                 probes.policy_op_s, probes.layout_layer_s, probes.layout_outside_s, probes.layout_step_s,
                 layout_peers=probes.layout_peers, layout_calls=probes.layout_calls, schedule_s=probes.schedule_s,
                 model=probes.model,
                 layout_probed=probes.layout_probed, schedule_probed=probes.schedule_probed)


@dataclass(frozen=True)
class GpuCalibration:
    """What a GPU reaches of its published rates in training, for cards that are not here to probe. Fitted on
    llm-foundry's A100 80GB table alone (``python benchmarks/published.py --fit``); its H100 tables and
    torchtitan's H100 runs are kept for checking (``python benchmarks/published.py``)."""

    matmul: float  # share of the attainable matmul rate (``hardware.attainable_tflops``) training's matmuls reach
    attention: float  # share of the published fused attention rate (``hardware.attention_tflops``) training reaches
    memory: float  # share of the datasheet memory bandwidth the memory-bound ops reach
    link: float = 0.75  # share of NVLink's or the network's bandwidth a collective reaches (ASSUMED)
    latency_s: float = 20e-6  # a collective's fixed cost inside a node (ASSUMED)
    inter_latency_s: float = 60e-6  # and across nodes (ASSUMED)
    # seconds a step still pays per second of data-parallel collectives run beside its compute (fitted: 0 would be
    # a perfect overlap). Contention alone (NCCL's kernels taking SMs and memory bandwidth from the matmuls) slows
    # the compute under it 18.9 % on average and at most 40 % on A100s and H100s (Lee et al. 2025, arXiv
    # 2507.03114); the fit's larger share also holds the overlap FSDP does not get (a gather that is late)
    overlap_cost: float = 0.0
    host_op_s: float = 10e-6  # the host's cost to dispatch one op with autograd (ASSUMED: eager PyTorch)


# benchmarks/published.py --fit
GPU_CALIBRATION = GpuCalibration(matmul=0.88, attention=0.45, memory=0.27, overlap_cost=0.73)
CAUSAL_SHARE = 0.5  # a causal flash-attention kernel skips the blocks above the diagonal
ATTENTION_REFERENCE = "a100_80gb"  # the option whose attention over matmul ratio a card without its own takes


@functools.lru_cache(maxsize=1)
def attention_over_matmul() -> float:
    """Where a card's option names no published attention rate: the A100 80GB option's FlashAttention-2 rate over
    its attainable bf16 matmul rate (times the card's own attainable matmul rate, ASSUMED)."""
    from costlab import CONF_DIR

    hw = OmegaConf.load(CONF_DIR / "hardware" / f"{ATTENTION_REFERENCE}.yaml")
    return float(hw.attention_tflops) / float(hw.attainable_tflops.bf16)


def _matmul_rate(hw: DictConfig, dtype: str) -> tuple[float, str]:
    """(FLOP/s, its source) a card's matmuls in ``dtype`` can reach before training's share: the option's
    published attainable rate; where it names none for ``dtype`` but does for bf16 (fp32's CUDA-core matmuls), the
    peak times bf16's attainable share of its peak (ASSUMED); else the peak."""
    peak = float(hw.peak_tflops[dtype]) * 1e12
    attainable = hw.get("attainable_tflops") or {}
    if attainable.get(dtype):
        return float(attainable[dtype]) * 1e12, f"{dtype} attainable {float(attainable[dtype]):.4g} TFLOP/s"
    if attainable.get("bf16") and hw.peak_tflops.get("bf16"):
        share = float(attainable.bf16) / float(hw.peak_tflops.bf16)
        return peak * share, (f"{dtype} peak {peak / 1e12:.4g} TFLOP/s x {share:.3g} (bf16's attainable share of its "
                              f"peak, ASSUMED) = {peak * share / 1e12:.4g} TFLOP/s")
    return peak, f"{dtype} peak {peak / 1e12:.4g} TFLOP/s"


FUSED_ATTENTION_DTYPES = ("bf16", "fp16")  # FlashAttention-2's; fp8 training keeps attention in bf16, fp32 has none


def gpu_rates(cfg: DictConfig, dtype: str, calibration: GpuCalibration | None = None) -> Rates:
    """The rates of one GPU of the ``hardware`` option, for a plan: its datasheet figures (peak in ``dtype``, the
    run's matmul dtype; memory bandwidth, NVLink and network bandwidth) times :data:`GPU_CALIBRATION`'s shares, the
    matmul peak first lowered to the published attainable rate (:func:`_matmul_rate`), and fused attention at its
    published rate (``attention_tflops``, FlashAttention-2's in bf16 and fp16; fp8 training's attention runs in
    bf16). Where the option names no published rate, or for fp32 (no flash kernel: PyTorch's memory-efficient one on
    the CUDA cores), attention takes the card's published attention over attainable bf16 matmul ratio (else
    :func:`attention_over_matmul`) of the matmul rate in its dtype (ASSUMED)."""
    hw = cfg.hardware
    base, matmul_source = _matmul_rate(hw, dtype)
    published = hw.get("attention_tflops")
    attention_dtype = "bf16" if dtype == "fp8" else dtype
    if published and attention_dtype in FUSED_ATTENTION_DTYPES:
        attention, attention_source = float(published) * 1e12, "published"
    else:
        named = (hw.get("attainable_tflops") or {}).get("bf16")
        ratio = float(published) / float(named) if published and named else attention_over_matmul()
        attention = _matmul_rate(hw, attention_dtype)[0] * ratio
        attention_source = f"ASSUMED ({attention_dtype}: {ratio:.3g} of its matmul rate)"
    c = calibration or GPU_CALIBRATION

    def link(gbps: float, latency: float) -> dict[str, tuple[float, float]]:
        return {kind: (latency, gbps * 1e9 * c.link) for kind in COLLECTIVES}

    nvlink, network = hw.get("nvlink_gbps"), hw.get("network_gbps")
    source = (f"hardware={hw.name}: {matmul_source} x "
              f"{c.matmul:.3g}, attention {attention_source} {attention / 1e12:.4g} TFLOP/s x "
              f"{c.attention:.3g} (causal half), memory {hw.memory_bandwidth_gbps} GB/s"
              f" x {c.memory:.3g}" + (f", in-node link {nvlink} GB/s" if nvlink else "")
              + (f", network {network} GB/s per GPU" if network else "")
              + f" x {c.link:.3g}, collectives beside the compute cost {c.overlap_cost:.3g} of their seconds; "
              "efficiencies fitted on llm-foundry's A100 80GB runs")
    return Rates(matmul_flops=base * c.matmul, bytes_per_s=float(hw.memory_bandwidth_gbps) * 1e9 * c.memory,
                 op_s=0.0, view_s=0.0, link=link(float(nvlink or network or 0) or 1.0, c.latency_s),
                 source=source, attention_flops=attention * c.attention, causal_share=CAUSAL_SHARE,
                 inter=link(float(network), c.inter_latency_s) if network else {},
                 per_node=int(cfg.trainer.nproc_per_node), host_op_s=c.host_op_s, overlap=True,
                 overlap_cost=c.overlap_cost)


def card_rates(cfg: DictConfig, dtype: str, probes: RankProbes) -> Rates:
    """The rates of one GPU of a run on it: what its card measured (:func:`card_probes`: its matmuls at the run's
    shapes, its host's dispatch per op, its memory's writes, the run's own model, the link between a node's cards)
    in place of the calibrated shares of the ``hardware`` option's figures; attention's rate, the network between
    nodes and the collectives' overlap stay the option's (:func:`gpu_rates`)."""
    import dataclasses

    plan = gpu_rates(cfg, dtype)
    source = ("probes on this card: the run's matmul shapes, a chain of small autograd ops (the host's dispatch), a "
              "large add" + (", the run's model plain at two depths on its micro-batch" if probes.model else "")
              + (", each collective at two sizes between this node's cards" if probes.link else "")
              + f"; attention, {'the network' if probes.link else 'links'} and overlap from the plan's rates "
              f"({plan.source})")
    return dataclasses.replace(plan, matmul_flops=probes.matmul_flops, bytes_per_s=probes.bytes_per_s,
                               host_op_s=probes.op_s, model=probes.model, link=probes.link or plan.link,
                               source=source)


def predicted_metrics(cfg: DictConfig, world: int, probes: RankProbes | None, build_optimizer: Any,
                      dtype: str = "fp32") -> tuple[dict[str, float], dict[str, str]]:
    """``perf/predicted_tokens_per_s`` and ``perf/predicted_step_time_ms`` with the tag that says what they rest
    on, or only the tag saying why there are none. ``probes``: the run's (:func:`probe_ranks`). A GPU run's rates
    are its ``hardware`` option's (:func:`gpu_rates`, in the run's matmul ``dtype``) with what its card measured in
    place of the calibrated shares (:func:`card_rates`; without probes, the option's alone); it also logs
    ``perf/planned_tokens_per_s``, what a plan of the run predicts from the option's calibrated rates alone."""
    hw = cfg.hardware
    cpu = cfg.trainer.device == "cpu"
    if not cpu and not (hw.get("memory_bandwidth_gbps") and dtype in (hw.get("peak_tflops") or {})):
        return {}, {TIME_MODEL_TAG: f"no prediction: hardware={hw.name} names no memory bandwidth or {dtype} peak"}
    if cpu and probes is None:
        return {}, {TIME_MODEL_TAG: "no prediction: no probes ran on this CPU"}
    out: dict[str, float] = {}
    try:
        if cpu:
            rates = cpu_rates(cfg, probes)
        else:
            plan = predict_step(cfg, world, gpu_rates(cfg, dtype), build_optimizer)
            out[PLANNED_TOKENS_PER_S] = plan.tokens_per_s
            rates = card_rates(cfg, dtype, probes) if probes is not None else gpu_rates(cfg, dtype)
        prediction = predict_step(cfg, world, rates, build_optimizer)
        if not cpu and probes is None:
            prediction.notes.append("the card's probes failed on a rank (its log says why): the plan's rates")
    except Exception as e:  # a model or optimizer the fake trace cannot run costs the run its prediction only
        return {}, {TIME_MODEL_TAG: f"no prediction: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    from costlab.measure.hardware import usd_per_hour

    out.update({PREDICTED_TOKENS_PER_S: prediction.tokens_per_s, PREDICTED_STEP_MS: 1000 * prediction.step_s})
    price = usd_per_hour(cfg)
    if price is not None:  # beside the measured cost/usd_per_1m_train_tokens, at the same price
        out[PREDICTED_USD_TRAIN] = price / (prediction.tokens_per_s * 3600) * 1e6
    return out, {TIME_MODEL_TAG: prediction.tag(rates)}
