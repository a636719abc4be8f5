"""The time model's arithmetic: a training step's work, traced from the run's own code on fake tensors and counted
as matmul FLOPs, ops and bytes (:func:`layer_work`, :func:`optimizer_work`), the rates a machine does them at
(:class:`Rates`), and a step's seconds from both (:func:`predict_step`): compute, the optimizer's step, each
collective at latency + bytes / bandwidth, the pipeline's bubble, and the parts probed on the run's own layout.
:mod:`costlab.measure.steptime` says how the parts add up; the rates come from :mod:`costlab.measure.stepprobes`
(a run), :mod:`costlab.measure.planprobes` (a plan on this CPU) or :mod:`costlab.measure.cardrates` (a card)."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

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
    step_op_s: float = 0.0  # an op of the optimizer's step, which runs without autograd (0: ``op_s``)


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
                + (f"{rates.step_op_s * 1e6:.3g} us per op of the optimizer's step (no autograd), "
                   if rates.step_op_s else "")
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


class CollectiveCounter:
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


def tp_collectives(cfg: DictConfig, shapes: Any, rows: int, layers: float, fsdp: bool,
                   tp: int) -> list[tuple[str, float, float]]:
    """Tensor parallel's collectives in one micro-batch's forward and backward of ``rows`` sequences on a rank that
    holds ``layers`` layers of a model of ``shapes`` (its width and vocabulary), each as (kind, calls, bytes a call),
    from the layout's own split (:func:`costlab.parallelism.tp.layer_all_reduces`): a block's row-wise outputs
    all-reduced in forward, in the autocast dtype of the matmuls that made them; its column-wise inputs' gradients
    in backward, in the residual stream's dtype; the embeddings' partial rows (the token embedding's, and a learned
    position embedding's, one row a position) and the head's input gradient all-reduced; the head's logits
    all-gathered over the vocabulary (a pipeline: the whole model's, as its compute outside the layers; a vocabulary
    the degree does not divide is gathered padded to the first rank's rows on every rank); a per-head
    module's weight gradient (Qwen3's q/k norms: one head's width, fp32) all-reduced; a packed projection's whole
    bias's gradient (GPT-2's c_attn: three widths, in the parameters' dtype; :class:`costlab.parallelism.tp.
    _Conv1DColwise`) all-gathered."""
    from costlab.measure.memory import _autocast_bytes, _residual_bytes, first_rank_rows
    from costlab.models.hf_config import is_hf, read_config
    from costlab.parallelism.tp import QKV_PARTS, gpt_layer_plan, hf_layer_plan, layer_all_reduces

    hf = is_hf(cfg)
    m = cfg.model
    config = read_config(m) if hf else {}
    plan = hf_layer_plan(config["model_type"]) if hf else gpt_layer_plan(m.get("mlp") == "swiglu")
    forward, backward, per_head = layer_all_reduces(plan)
    block, width = int(cfg.model.block_size), int(shapes.n_embd)
    residual, computed = _residual_bytes(cfg, fsdp), _autocast_bytes(cfg)
    positions = 0 if hf or cfg.model.get("pos", "learned") != "learned" else 1
    head = int(config.get("head_dim") or width // int(shapes.n_head))
    return [("all_reduce", forward * layers, rows * block * width * computed),
            ("all_reduce", backward * layers + 2, rows * block * width * residual),  # + the head's, the tokens'
            ("all_reduce", positions, block * width * residual),
            ("all_gather", 1, rows * block * first_rank_rows(int(shapes.vocab_size), tp) * tp * computed),
            ("all_reduce", per_head * layers, head * 4),
            ("all_gather", list(plan.values()).count("qkv_colwise") * layers, QKV_PARTS * width * residual)]


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

    def compute(w: Work, op_s: float = rates.op_s) -> float:
        device = matmuls(w) + w.bytes / rates.bytes_per_s + w.ops * op_s + w.views * rates.view_s
        return max(device, (w.ops + w.views) * rates.host_op_s)  # a GPU waits for its host's dispatch

    n_mb = int(t.grad_accum_steps) * micro
    opt_layer, opt_outside, layer_weights, outside_weights, note = optimizer_work(cfg, build_optimizer)
    opt = opt_layer.scaled(ops=layers, data=layers) + opt_outside  # each rank steps every tensor it holds a part of
    notes = [note] if note else []
    optimizer = compute(opt.scaled(data=1 / (dims.dp_shard * tp)), rates.step_op_s or rates.op_s)
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
    units = math.ceil(layers) + 1  # FSDP2 gathers and reduces each block's group and the root's apart
    if dims.dp_replicate > 1 and not probed:  # a probed wrapping holds its own all-reduces
        # DDP's buckets; HSDP's: each FSDP group's gradient shard, all-reduced across the replicas
        data_parallel += syncs * _collective(rates, dims.dp_replicate, grad_bytes / dims.dp_shard, "all_reduce",
                                             calls=units if dims.fsdp_enabled else 1, latency=not counted,
                                             span=dims.dp_replicate * shard_span)
    # a DDP's wrapping runs once a step: it syncs one micro-batch a step, the others run under no_sync, its hooks idle
    # (DDP alone: with dp_shard, dp_replicate is FSDP2's HSDP, whose hooks run every micro-batch)
    wrapped_mbs = 1 if dims.ddp_enabled else n_mb
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
                           for kind, calls, data in tp_collectives(cfg, shapes, rows, layers, dims.fsdp_enabled, tp))
    if cfg.trainer.get("activation_checkpointing", "none") == "selective" and not rates.model:
        # selective checkpointing's policy sees every op of a block's forward and of its recompute in Python
        plain, _ = layer_work(cfg, traced, dims.fsdp_enabled, "none")
        policed = layer.forward_ops + max(0.0, layer.ops + layer.views - plain.ops - plain.views)
        parts["selective_checkpointing"] = n_mb * layers * policed * max(0.0, rates.policy_op_s - rates.op_s)
    if dims.pp_enabled:  # each chunk's activation forward and gradient back
        comm += n_mb * 2 * v * _collective(rates, 2, activation, "p2p", latency=not probed,
                                           span=world // dims.pp + 1)
    parts["communication"] = comm
    reduction = loss_reduction(rates, dims, world) / max(1, int(t.get("log_every", 1) or 1))
    if reduction:
        parts["loss_reduction"] = reduction
    step = sum(parts.values())
    return Prediction(step, t.batch_size * int(m.block_size) / step, parts, notes)


def loss_reduction(rates: Rates, dims: Any, world: int) -> float:
    """Seconds of the loss's reduction a logged step makes (:meth:`costlab.parallelism.core.Parallel.global_loss`,
    every ``trainer.log_every`` steps): a pipeline's last stage broadcasts it to the other stages (priced as an
    all-gather's fixed cost), then the data-parallel ranks all-reduce it; one number each, so their fixed costs.
    Neither the layout's nor the schedule's probe calls it."""
    seconds = 0.0
    if dims.pp_enabled:
        seconds += _collective(rates, dims.pp, 4, "all_gather", span=world)
    if dims.dp > 1:
        seconds += _collective(rates, dims.dp, 4, "all_reduce", span=world // dims.pp)
    return seconds


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
LAYOUT_DEPTHS = (1, 3)  # the depths the layout probe builds; a layer's cost is their difference over the layers


def per_layer(seconds: dict[int, tuple[float, float]]) -> tuple[float, float, float, float]:
    """(passes per layer, passes outside the layers, step per layer, step outside) from :func:`depth_seconds`'s
    figures: a layer's is the difference over the depths, the outside's what the shallowest has beyond its layers;
    none below 0."""
    (low, high), span = LAYOUT_DEPTHS, LAYOUT_DEPTHS[1] - LAYOUT_DEPTHS[0]
    layer, step_layer = (max(0.0, (seconds[high][i] - seconds[low][i]) / span) for i in (0, 1))
    outside, step_outside = (max(0.0, seconds[low][i] - low * per) for i, per in ((0, layer), (1, step_layer)))
    return layer, outside, step_layer, step_outside


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
