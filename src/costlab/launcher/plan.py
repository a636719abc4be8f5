"""``mode=plan``: what a configuration would need and cost on the hardware it names, before renting it.

Nothing is trained and nothing is allocated: the model is built on the meta device, laid out per rank
by the memory model (:mod:`costlab.measure.memory`), and its FLOPs counted by the cost model
(:mod:`costlab.measure.hardware`). The throughput is an *assumption* (``plan.mfu`` of the datasheet peak), and
every figure derived from it is labelled so.

    python run.py mode=plan model=llama_7b hardware=h100_sxm parallelism=fsdp trainer.nproc_per_node=8
    python run.py -m mode=plan model=gpt2_small hardware=a100_80gb parallelism=ddp,fsdp,tp,pp trainer.nproc_per_node=4
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from costlab.measure.hardware import device_peak, flops_per_token, usd_per_hour
from costlab.measure.memory import PREDICTED, predict_state
from costlab.precision import matmul_dtype

PLAN = "plan/"  # + the figures below: a plan's metrics, never mixed with measured ones
GB = 1e9
# On a GPU, beside what the memory model counts: the CUDA context, cuBLAS' and NCCL's workspaces, and the blocks the
# caching allocator holds but has not handed out. An ASSUMED allowance, said as such in every plan: a fixed part
# (PyTorch's CUDA context alone is ~0.5 GB on recent cards) and a share of the counted bytes (the allocator's
# reserved-over-allocated overhead, which runs log as mem/peak_reserved_bytes beside mem/peak_bytes)
GPU_FIXED_ALLOWANCE = 1.5e9
GPU_ALLOWANCE_SHARE = 0.10


def make_plan(cfg: DictConfig) -> tuple[dict[str, float], list[str]]:
    """The plan's metrics and the lines that tell it."""
    import torch

    from costlab.models.gpt import build_model

    t, hw = cfg.trainer, cfg.hardware
    world = int(t.nnodes * t.nproc_per_node)
    with torch.device("meta"):
        model = build_model(cfg.model)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    flops = flops_per_token(model, cfg.model.block_size)
    state = predict_state(cfg, world)
    per_device = sum(state.values())  # parameters, gradients, optimizer state, activations and recompute
    if hw.name != "cpu":
        state[f"{PREDICTED}allowance_bytes_per_rank"] = GPU_FIXED_ALLOWANCE + GPU_ALLOWANCE_SHARE * per_device
        per_device = sum(state.values())
    held = sum(state[f"{PREDICTED}{part}_bytes_per_rank"] for part in ("params", "grads", "optimizer"))
    out: dict[str, float] = {f"{PLAN}params": params, f"{PLAN}flops_per_token": flops,
                             f"{PLAN}state_bytes_per_device": held,
                             f"{PLAN}memory_bytes_per_device": per_device, **state}
    dtype = matmul_dtype(cfg)
    lines = [f"costlab plan: model={cfg.model.name} ({params / 1e9:.3g}B parameters), parallelism="
             f"{cfg.parallelism.name} on {world} x {hw.name}, {dtype} matmuls; nothing is trained or allocated"]
    def label(key: str) -> str:
        part = key[len(PREDICTED):].split("_")[0]
        return part if part != "allowance" else (f"allowance (ASSUMED: {GPU_FIXED_ALLOWANCE / GB:.3g} GB + "
                                                 f"{GPU_ALLOWANCE_SHARE:.0%}: CUDA context, workspaces, allocator)")

    parts = ", ".join(f"{label(k)} {v / GB:.3g} GB" for k, v in state.items())
    capacity = hw.get("memory_gb")
    if capacity:
        margin = capacity * GB - per_device
        out[f"{PLAN}memory_margin_bytes"] = margin
        verdict = f"fits, {margin / GB:.3g} GB to spare" if margin >= 0 else f"DOES NOT FIT by {-margin / GB:.3g} GB"
        lines.append(f"  per-device memory: {parts} = {per_device / GB:.3g} GB of {capacity} GB ({verdict})")
    else:
        lines.append(f"  per-device memory: {parts} = {per_device / GB:.3g} GB (hardware={hw.name} names no capacity)")
    lines.append(f"  training FLOPs per token: {flops:.4g} (6N + attention)")
    peak, source = device_peak(cfg, int(t.nproc_per_node), dtype)
    if peak is None:
        lines.append(f"  no time or cost: {source}")
        return out, lines
    mfu = float(cfg.plan.mfu)
    given = cfg.plan.get("tokens")
    tokens = float(given) if given else float(t.max_steps) * t.batch_size * cfg.model.block_size
    what = "plan.tokens" if given else f"trainer.max_steps={t.max_steps}"
    tokens_per_s = mfu * peak * 1e12 * world / flops
    hours = tokens / tokens_per_s / 3600
    out.update({f"{PLAN}mfu_assumed": mfu, f"{PLAN}tokens_per_s_assumed": tokens_per_s, f"{PLAN}hours": hours,
                f"{PLAN}tokens": tokens})
    line = (f"  at an ASSUMED MFU of {mfu:.0%} of {peak:.4g} TFLOP/s per device ({source}): {tokens_per_s:,.0f} "
            f"tokens/s, {tokens:.3g} tokens ({what}) in {hours:.3g} h ({hours / 24:.3g} days)")
    price = usd_per_hour(cfg)
    if price is not None:
        out[f"{PLAN}usd"] = price * hours
        per_1m = out[f"{PLAN}usd_per_1m_train_tokens"] = price / (tokens_per_s * 3600) * 1e6
        line += f", ${price * hours:,.2f} at ${price:.2f}/h (${per_1m:.4f} per 1M tokens)"
    lines.append(line)
    return out, lines


def print_plan(lines: list[str]) -> None:
    print("\n".join(lines), file=sys.stderr, flush=True)
