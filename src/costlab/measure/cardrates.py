"""A card's rates for the time model: its ``hardware`` option's datasheet figures times the efficiencies fitted on
published A100 runs (:data:`GPU_CALIBRATION`, :func:`gpu_rates`), and a GPU run's, with what its card measured in
place of the fitted shares (:func:`card_rates`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from costlab.measure.stepprobes import RankProbes
from costlab.measure.timemodel import COLLECTIVES, Rates


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
