"""``mode=plan``: what a configuration would need and cost on the hardware it names, before renting it.

Nothing is trained and nothing is allocated: the model is built on the meta device, laid out per rank
by the memory model (:mod:`costlab.measure.memory`), and its FLOPs counted by the cost model
(:mod:`costlab.measure.hardware`). The step time is the time model's (:mod:`costlab.measure.steptime`): on a GPU
option its datasheet rates times efficiencies calibrated on published runs, on ``hardware=cpu`` this machine's
probed rates; ``plan.mfu=`` replaces it with an assumed utilisation, and every figure says which it is.

    python run.py mode=plan model=llama_7b hardware=h100_sxm parallelism=fsdp trainer.nproc_per_node=8
    python run.py -m mode=plan model=gpt2_small hardware=a100_80gb parallelism=ddp,fsdp,tp,pp trainer.nproc_per_node=4
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from costlab.measure.hardware import device_peak, flops_per_token, usd_per_hour
from costlab.measure.memory import (
    BACKWARD_OVERLAP,
    GATHERED,
    LOSS_BACKWARD,
    OPTIMIZER_STEP,
    PREDICTED,
    TIED_GRADIENT,
    predict_layout_state,
    with_step_parts,
)
from costlab.measure.names import (
    PLAN,  # + the figures below: a plan's metrics, never mixed with measured ones
    PLAN_HOURS,
    PLAN_MARGIN,
    PLAN_MEMORY,
    PLAN_MFU,
    PLAN_TOKENS_PER_S,
    PLAN_USD,
    PLAN_USD_PER_1M,
)
from costlab.measure.planprobes import MODEL_PROBE_S
from costlab.measure.steptime import TIME_MODEL_TAG
from costlab.precision import matmul_dtype

GB = 1e9
# On a GPU, beside what the memory model counts: the CUDA context, cuBLAS' and NCCL's workspaces, and the blocks the
# caching allocator holds but has not handed out. An ASSUMED allowance, said as such in every plan: a fixed part
# (PyTorch's CUDA context alone is ~0.5 GB on recent cards) and a share of the counted bytes (the allocator's
# reserved-over-allocated overhead, which runs log as mem/peak_reserved_bytes beside mem/peak_bytes)
GPU_FIXED_ALLOWANCE = 1.5e9
GPU_ALLOWANCE_SHARE = 0.10
TRACED_ROWS = 2  # sequences a plan traces its step with, scaled to the micro-batch's (:func:`predict_time`)


def allowance(counted: float) -> float:
    """The ASSUMED bytes a GPU holds beside the ``counted`` ones (the memory model's parts)."""
    return GPU_FIXED_ALLOWANCE + GPU_ALLOWANCE_SHARE * counted


@functools.lru_cache(maxsize=8)
def _model_figures(model: str) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of a ``model`` node (JSON), built on the meta device."""

    from costlab.models.gpt import build_model
    from costlab.models.meta import on_meta

    node = OmegaConf.create(json.loads(model))
    with on_meta():
        built = build_model(node)
    params = sum(p.numel() for p in {id(p): p for p in built.parameters()}.values())
    return params, flops_per_token(built, node.block_size)


@functools.lru_cache(maxsize=8)
def _peak(hardware: str, ranks: int, dtype: str) -> tuple[float | None, str]:
    """:func:`~costlab.measure.hardware.device_peak` of a ``hardware`` node (YAML), once per process: a CPU's is
    probed, and a search asks for every candidate."""
    return device_peak(OmegaConf.create({"hardware": OmegaConf.create(hardware)}), ranks, dtype)


def capacity_bytes(cfg: DictConfig) -> tuple[float | None, str]:
    """One device's memory and what it is: the GPU option's, or a CPU rank's share of what this machine has."""
    hw = cfg.hardware
    if hw.get("memory_gb"):
        return float(hw.memory_gb) * GB, f"{hw.memory_gb} GB"
    if hw.name == "cpu":
        from costlab.launcher.resources import cpu_memory_available

        available = cpu_memory_available()
        if available:
            share = available / int(cfg.trainer.nproc_per_node)
            return share, f"{share / GB:.3g} GB (this machine's available memory per rank)"
    return None, f"hardware={hw.name} names no capacity"


def make_plan(cfg: DictConfig, tags: dict[str, str] | None = None) -> tuple[dict[str, float], list[str]]:
    """The plan's metrics and the lines that tell it; ``tags`` receives the time model's (what it rests on)."""
    out, lines, time_tags = plan_figures(cfg)
    if tags is not None:
        tags.update(time_tags)
    return out, lines


def plan_figures(cfg: DictConfig, states: dict[tuple, dict[str, float]] | None = None,
                 key: tuple | None = None, timed_unless_over: bool = False) -> tuple[dict[str, float], list[str],
                                                                                    dict[str, str]]:
    """The plan's metrics, its lines and the time model's tags. ``states``: the parameter, gradient and optimizer
    bytes already predicted per layout ``key`` (a search's candidates share them); ``timed_unless_over``: no time
    or cost for a plan over its card's memory (a search drops it)."""
    tags: dict[str, str] = {}
    t, hw = cfg.trainer, cfg.hardware
    world = int(t.nnodes * t.nproc_per_node)
    params, flops = _model_figures(json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True))
    if states is not None and key in states:
        state = dict(states[key])
    else:
        layout = cfg
        if cfg.precision.get("float8"):  # a Float8Linear keeps its weight in full precision: the bytes of bf16's
            layout = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            layout.precision.float8 = False
        state = predict_layout_state(layout, world)
        if states is not None:
            states[key] = dict(state)
    state = with_step_parts(cfg, world, state)
    per_device = sum(state.values())  # state, activations, recompute and the step's transients
    if hw.name != "cpu":
        state[f"{PREDICTED}allowance_bytes_per_rank"] = allowance(per_device)
        per_device = sum(state.values())
    held = sum(state[f"{PREDICTED}{part}_bytes_per_rank"] for part in ("params", "grads", "optimizer"))
    out: dict[str, float] = {f"{PLAN}params": params, f"{PLAN}flops_per_token": flops,
                             f"{PLAN}state_bytes_per_device": held,
                             PLAN_MEMORY: per_device, **state}
    dtype = matmul_dtype(cfg)
    lines = [f"costlab plan: model={cfg.model.name} ({_count(params)} parameters), parallelism="
             f"{cfg.parallelism.name} on {world} x {hw.name}, {dtype} matmuls; nothing is trained or allocated"]
    def label(key: str) -> str:
        part = key[len(PREDICTED):].split("_")[0]
        if key == LOSS_BACKWARD:
            return "loss backward (2 fp32 tokens x vocabulary less the gradients not yet held, or the head's gradient)"
        if key == TIED_GRADIENT:
            return "tied gradient (the head's, the embedding's and their sum, at the end of backward)"
        if key == GATHERED:
            return "fsdp gathered (root, two blocks, their unsharded gradients)"
        if key == OPTIMIZER_STEP:
            return "optimizer step (foreach temporaries: one fp32 value per trained parameter, over backward's peak)"
        if key == BACKWARD_OVERLAP:
            return "backward overlap (gradients made as backward frees the activations: never both whole)"
        return part if part != "allowance" else (f"allowance (ASSUMED: {GPU_FIXED_ALLOWANCE / GB:.3g} GB + "
                                                 f"{GPU_ALLOWANCE_SHARE:.0%}: CUDA context, workspaces, allocator)")

    parts = ", ".join(f"{label(k)} {v / GB:.3g} GB" for k, v in state.items())
    capacity, what = capacity_bytes(cfg)
    if capacity:
        margin = capacity - per_device
        out[PLAN_MARGIN] = margin
        verdict = f"fits, {margin / GB:.3g} GB to spare" if margin >= 0 else f"DOES NOT FIT by {-margin / GB:.3g} GB"
        lines.append(f"  per-device memory: {parts} = {per_device / GB:.3g} GB of {what} ({verdict})")
    else:
        lines.append(f"  per-device memory: {parts} = {per_device / GB:.3g} GB ({what})")
    lines.append(f"  training FLOPs per token: {flops:.4g} (6N + attention)")
    if timed_unless_over and out.get(PLAN_MARGIN, 0.0) < 0:
        return out, lines, tags
    peak, source = _peak(OmegaConf.to_yaml(hw, resolve=True), int(t.nproc_per_node), dtype)
    if peak is None:
        lines.append(f"  no time or cost: {source}")
        return out, lines, tags
    given = cfg.plan.get("tokens")
    tokens = float(given) if given else float(t.max_steps) * t.batch_size * cfg.model.block_size
    what = "plan.tokens" if given else f"trainer.max_steps={t.max_steps}"
    if cfg.plan.get("mfu") is not None:  # the explicit override: an assumed utilisation of the datasheet peak
        mfu = float(cfg.plan.mfu)
        tokens_per_s = mfu * peak * 1e12 * world / flops
        out.update({f"{PLAN}mfu_assumed": mfu, f"{PLAN}tokens_per_s_assumed": tokens_per_s})
        how = f"at an ASSUMED MFU of {mfu:.0%} (plan.mfu) of {peak:.4g} TFLOP/s per device ({source})"
    else:
        prediction, rates = predict_time(cfg, world, TRACED_ROWS,
                                         probe_model=out.get(PLAN_MARGIN, 0.0) >= 0)
        if prediction is None:
            lines.append(f"  no time or cost: {rates}")
            return out, lines, tags
        tokens_per_s = prediction.tokens_per_s
        mfu = flops * tokens_per_s / world / (peak * 1e12)
        out.update({PLAN_TOKENS_PER_S: tokens_per_s, PLAN_MFU: mfu,
                    f"{PLAN}step_time_ms": 1000 * prediction.step_s})
        tags[TIME_MODEL_TAG] = prediction.tag(rates)
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.3g} s" for k, v in prediction.parts.items() if v)
        lines.append(f"  predicted step: {prediction.step_s:.3g} s ({parts}); {rates.source}"
                     + "".join(f"\n    {gap}" for gap in prediction.gaps))
        how = f"PREDICTED: MFU {mfu:.1%} of {peak:.4g} TFLOP/s per device ({source})"
    hours = tokens / tokens_per_s / 3600
    out.update({PLAN_HOURS: hours, f"{PLAN}tokens": tokens})
    line = (f"  {how}: {tokens_per_s:,.0f} tokens/s ({tokens_per_s / world:,.0f} per device), {tokens:.3g} tokens "
            f"({what}) in {hours:.3g} h ({hours / 24:.3g} days)")
    price = usd_per_hour(cfg)
    if price is not None:
        out[PLAN_USD] = price * hours
        per_1m = out[PLAN_USD_PER_1M] = price / (tokens_per_s * 3600) * 1e6
        line += f", ${price * hours:,.2f} at ${price:.2f}/h (${per_1m:.4f} per 1M tokens)"
    lines.append(line)
    return out, lines, tags


def predict_time(cfg: DictConfig, world: int, traced_rows: int | None = None,
                 calibration: Any = None, probe_model: bool = True) -> tuple[Any, Any]:
    """(:class:`~costlab.measure.timemodel.Prediction`, its rates) of the plan's step, or (None, why not). A GPU's
    rates are its datasheet figures times the calibrated shares (:func:`~costlab.measure.cardrates.gpu_rates`;
    ``calibration``: other shares than :data:`~costlab.measure.cardrates.GPU_CALIBRATION`, as a fit tries them);
    this CPU's are probed here, in this one process (no peers: its collectives are priced from the link that runs of
    as many ranks here kept, where one did, the tag says what was not priced); where its step is predicted under
    :data:`MODEL_PROBE_S` without it, and unless ``probe_model`` is false (a plan that does not fit this machine),
    the run's own model is probed too (a small model's step is its ops' fixed costs more than its matmuls; the
    probe runs its forward and backward a dozen times at 1 and 3 layers), and its FSDP's, tensor parallel's or
    DDP's wrapping as the layout's rank 0 runs it (:func:`~costlab.measure.planprobes.local_layout`)."""
    from costlab.measure.cardrates import gpu_rates
    from costlab.measure.planprobes import plan_cpu_rates, plan_gaps
    from costlab.measure.timemodel import predict_step
    from costlab.training.optimizers import build_optimizer

    try:
        if cfg.hardware.name == "cpu":
            rates = plan_cpu_rates(cfg, world)  # its probes are cached: asked again, only the model's run
            if probe_model and predict_step(cfg, world, rates, build_optimizer, traced_rows).step_s < MODEL_PROBE_S:
                rates = plan_cpu_rates(cfg, world, build_optimizer)
        elif cfg.hardware.get("memory_bandwidth_gbps"):
            rates = gpu_rates(cfg, matmul_dtype(cfg), calibration)
        else:
            return None, f"hardware={cfg.hardware.name} names no memory bandwidth"
        prediction = predict_step(cfg, world, rates, build_optimizer, traced_rows)
    except ValueError as e:  # a model without layers to trace
        return None, str(e)
    if cfg.hardware.name == "cpu":
        prediction.gaps.extend(plan_gaps(cfg, world, rates))
    return prediction, rates


def print_plan(lines: list[str]) -> None:
    print("\n".join(lines), file=sys.stderr, flush=True)


def _count(n: float) -> str:
    """A parameter count as people write it: 329K, 124M, 6.7B."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
