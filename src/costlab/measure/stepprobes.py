"""The probes a run's ranks time at the end of the run (:func:`probe_ranks`), every rank at once: the run's
matmul shapes in its dtype, a chain of small autograd ops (and of views), a large add, each collective at two
sizes, the run's model plain at two depths on its micro-batch, and the layout's wrapping or the pipeline's schedule
as the run runs them; on a GPU its card's (:func:`card_probes`). :func:`cpu_rates` turns a CPU's into the time
model's :class:`~costlab.measure.timemodel.Rates`."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from costlab.measure.timemodel import (
    COLLECTIVES,
    LAYOUT_DEPTHS,
    MATMULS,
    CollectiveCounter,
    ModelProbe,
    Rates,
    per_layer,
    stage_layers,
)

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


def seconds_per_step_op(min_s: float = 0.1) -> float:
    """The fixed cost of one aten op of an optimizer's step, which runs without autograd: a chain of in-place
    multiplications of a tiny tensor under ``torch.no_grad()``, the best of repeats per op. On the 2-core EPYC it
    reads 2.0-2.7 us where :func:`seconds_per_op`'s chain, which records and runs a backward, reads 3.6: priced at
    that, a 4-layer GPT's AdamW step (clipping and zeroing included, 633 ops) came out 2.58 ms against 1.66
    measured."""
    import torch

    def chain() -> int:
        x = torch.ones(8)
        with torch.no_grad():
            for _ in range(OP_CHAIN):
                x.mul_(1.0001)
        return OP_CHAIN

    return _best_per_op(chain, min_s)


LINK_SIZES = (1024, 4 * 2**20)  # bytes of the two calls of each collective that fit latency and bandwidth
CARD_LINK_SIZES = (1024, 64 * 2**20)  # between cards (NVLink moves 4 MiB in microseconds)


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
    # torch 2.13 renamed the tensor collectives (the old names warn); earlier versions have the old names only
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def call(kind: str, size: int) -> Any:
        part = own[:size // 4 // n]
        full = whole[:part.numel() * n]
        if kind == "all_reduce":
            return lambda: dist.all_reduce(full, group=group)
        if kind == "all_gather":
            return lambda: gather(full, part, group=group)
        return lambda: scatter(part, full, group=group)

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


def run_shapes(cfg: DictConfig, world: int) -> tuple[int, int, int, int, str]:
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
        if dims.ddp_enabled:  # as the run wraps it (DDP alone: with dp_shard, FSDP2 holds the replicas)
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
                    with CollectiveCounter() as counter:
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
    step_op_s: float = 0.0  # per op of the optimizer's step, without autograd (0: ``op_s``)


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
    times = rank_times(selective, *run_shapes(cfg, world))  # per FLOP, op, view, byte, policed op, step op
    rates = len(times)
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
    modelled = rates + 4  # after the layout's three figures and the schedule's
    if probed_model:
        times += plain_model_seconds(cfg, world, build_optimizer)
    w = slowest_rank(times, (rates, modelled) if probed_model else (rates,), stage_layers(cfg, world))
    link = link_probe() if world > 1 else None
    model = ModelProbe(w[modelled], w[modelled + 1], 1 / w[modelled + 2]) if probed_model else None
    return RankProbes(1 / w[0], w[1], w[2], 1 / w[3], link, w[4], *w[rates:rates + 3], model=model,
                      schedule_s=w[rates + 3], layout_probed=wrapped, schedule_probed=pipelined, step_op_s=w[5])


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
    tokens, width, hidden, _, dtype = run_shapes(cfg, world)
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
        tokens, width, hidden, tp, dtype = run_shapes(cfg, world)
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


def with_threads(threads: int, probe: Any) -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return probe()
    finally:
        torch.set_num_threads(before)


def rank_times(selective: bool, tokens: int, width: int, hidden: int, tp: int, dtype: str) -> list[float]:
    """A CPU rank's rates as seconds: per FLOP of the run's matmul shapes (:func:`matmul_mix_rate`), per op, per
    view, per byte written (:func:`memory_bandwidth`), per op under selective checkpointing's policy (0 without
    ``selective``), and per op of the optimizer's step (:func:`seconds_per_step_op`): what :func:`probe_ranks` times
    on every rank at once, and a plan's companions beside it."""
    return matmul_seconds(tokens, width, hidden, tp, dtype) + fixed_times(selective)


def matmul_seconds(tokens: int, width: int, hidden: int, tp: int, dtype: str) -> list[float]:
    """[seconds per FLOP of the run's matmul shapes (:func:`matmul_mix_rate`)]: :func:`rank_times`' first."""
    return [1 / matmul_mix_rate(tokens, width, hidden, tp, dtype)]


def fixed_times(selective: bool) -> list[float]:
    """:func:`rank_times` less the matmuls: seconds per op, per view, per byte written, per policed op (or 0), per
    op of the optimizer's step."""
    return [seconds_per_op(), seconds_per_view(), 1 / memory_bandwidth(),
            seconds_per_policed_op() if selective else 0.0, seconds_per_step_op()]


def cpu_rates(cfg: DictConfig, probes: RankProbes, where: str = "on every rank at once") -> Rates:
    """The rates of one rank of a CPU run: what the ranks measured at once (:func:`probe_ranks`); a plan's, what
    this one process measured (:func:`local_probes`), ``where`` saying so."""
    return Rates(probes.matmul_flops, probes.bytes_per_s, probes.op_s, probes.view_s, probes.link or {},
                 f"probes {where}: the run's matmul shapes, op and view chains, a large add"
                 + (", each collective at two sizes" if probes.link else "")
                 + (", ops under a dispatch-mode policy" if probes.policy_op_s else "")
                 + (", an optimizer's op chain without autograd" if probes.step_op_s else "")
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
                 model=probes.model, layout_probed=probes.layout_probed, schedule_probed=probes.schedule_probed,
                 step_op_s=probes.step_op_s)
