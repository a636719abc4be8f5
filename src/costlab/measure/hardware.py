"""The cost model: FLOPs per token, how close a run came to the hardware's peak (MFU), and what a million
tokens cost, from the run's measured throughputs and the ``hardware`` option's peak and price.

    perf/flops_per_token       = 6 * N + 12 * n_layer * n_head * head_dim * seq_len      (training)
    perf/tflops_per_device     = flops_per_token * perf/tokens_per_s / devices / 1e12
    perf/mfu                   = perf/tflops_per_device / peak TFLOP/s of the run's matmul dtype
    cost/usd_per_1m_train_tokens = usd_per_hour * devices / (perf/tokens_per_s * 3600) * 1e6
    cost/usd_per_1m_infer_tokens = usd_per_hour * 1 device / (infer/tokens_per_s * 3600) * 1e6
    serve/usd_per_1m_output_tokens = usd_per_hour * 1 device / (serve/target_output_tokens_per_s * 3600) * 1e6
    cost/usd_run               = usd_per_hour * devices * time/total_s / 3600

N is the number of weights the forward pass multiplies with: every ``nn.Linear``'s weight, the output
head included even when it shares the embedding's storage (it is still a matmul), and no embedding
lookups, norms or biases (PaLM's and torchtitan's "N without embeddings" for an untied head). The
attention term is PaLM's: QK^T and AV over the whole sequence, 4 * seq_len * n_head * head_dim FLOPs
per token and layer forward, times 3 for forward and backward (a causal mask halves the useful part;
like the FLOP counter, this counts the matmul as run). Activation recomputation is not counted: MFU
is model FLOPs, not hardware FLOPs.

A "device" is a GPU; on CPU it is one rank (its share of the cores), and a node's price is
``usd_per_core_hour`` times the cores the run uses. GPU peaks and prices are datasheet and list
figures (``conf/hardware/<option>.yaml`` names their sources); a CPU's peak is measured on the machine
(:func:`costlab.measure.probes.cpu_peak_tflops`).
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from costlab.measure.names import SERVE_USD
from costlab.schema import ConfigError

FLOPS_PER_TOKEN = "perf/flops_per_token"
TFLOPS_PER_DEVICE = "perf/tflops_per_device"
MFU = "perf/mfu"
PEAK_TFLOPS = "perf/peak_tflops_per_device"
USD_TRAIN = "cost/usd_per_1m_train_tokens"
USD_INFER = "cost/usd_per_1m_infer_tokens"
USD_RUN = "cost/usd_run"
USD_PER_HOUR = "cost/usd_per_hour"
PEAK_SOURCE_TAG = "costlab.peak_source"  # the datasheet option, or the CPU probe
NO_MFU_TAG = "costlab.mfu_missing"  # why MFU was not logged
HARDWARE_TAG = "hardware"

def matmul_params(model: Any) -> int:
    """N: the weights of every ``nn.Linear`` (each module once, a tied head included), and of every
    ``transformers`` ``Conv1D`` (GPT-2's linear layers, stored transposed)."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward) of ``model`` at ``seq_len``: 6 N plus PaLM's
    attention term for models built of attention blocks."""
    n = matmul_params(model)
    cfg = getattr(model, "config", None)
    attention = 0
    if cfg is not None and getattr(model, "blocks", None) is not None:
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return float(6 * n + attention)


def devices(cfg: DictConfig) -> int:
    return int(cfg.trainer.nnodes * cfg.trainer.nproc_per_node)


def usd_per_hour(cfg: DictConfig) -> float | None:
    """What the run's devices cost per hour together (None without a price): GPUs x price, or the
    cores of every node x the per-core price."""
    hw = cfg.hardware
    if hw.name == "cpu":
        per_core = hw.get("usd_per_core_hour")
        return None if per_core is None else float(per_core) * (os.cpu_count() or 1) * cfg.trainer.nnodes
    price = hw.get("usd_per_hour")
    return None if price is None else float(price) * devices(cfg)


def cost_metrics(cfg: DictConfig, flops: float, peak_tflops: float | None, train_tps: float | None,
                 infer_tps: float | None, serve_tps: float | None = None) -> dict[str, float]:
    """The cost model's metrics from a run's training FLOPs per token, the peak per device of its matmul
    dtype (None: unknown) and its measured throughputs: training tokens/s of all ranks together,
    inference tokens/s of the final model on one device, and the output tokens/s it served on one device
    at the latency target (None: not measured)."""
    out = {FLOPS_PER_TOKEN: flops}
    n = devices(cfg)
    if train_tps:
        out[TFLOPS_PER_DEVICE] = flops * train_tps / n / 1e12
        if peak_tflops:
            out[PEAK_TFLOPS] = peak_tflops
            if out[TFLOPS_PER_DEVICE] <= peak_tflops:  # above it, the peak is wrong, not the run
                out[MFU] = out[TFLOPS_PER_DEVICE] / peak_tflops
    per_hour = usd_per_hour(cfg)
    if per_hour is not None:
        out[USD_PER_HOUR] = per_hour
        if train_tps:
            out[USD_TRAIN] = per_hour / (train_tps * 3600) * 1e6
        # inference and serving ran on one device (on CPU: rank 0 with the node's cores)
        one = per_hour / n if cfg.trainer.device != "cpu" else per_hour / cfg.trainer.nnodes
        if infer_tps:
            out[USD_INFER] = one / (infer_tps * 3600) * 1e6
        if serve_tps:
            out[SERVE_USD] = one / (serve_tps * 3600) * 1e6
    return out


def run_cost(cfg: DictConfig, seconds: float) -> dict[str, float]:
    """``cost/usd_run``: the devices' price for the job's wall time (empty without a price)."""
    per_hour = usd_per_hour(cfg)
    return {} if per_hour is None else {USD_RUN: per_hour * seconds / 3600}


def _option(name: str) -> DictConfig:
    from costlab import CONF_DIR

    return OmegaConf.load(CONF_DIR / "hardware" / f"{name}.yaml")


def match_gpu(gpu_name: str) -> str | None:
    """The ``hardware`` option whose ``match`` names a substring of ``gpu_name`` (as nvidia-smi reports it)."""
    from costlab import CONF_DIR

    for path in sorted((CONF_DIR / "hardware").glob("*.yaml")):
        if any(pattern in gpu_name for pattern in OmegaConf.load(path).get("match") or []):
            return path.stem
    return None


def resolve_hardware(cfg: DictConfig, planning: bool = False) -> DictConfig:
    """The run's ``hardware`` node with ``auto`` resolved (launcher side; no torch): the option matching the
    GPU nvidia-smi names on a CUDA run, ``cpu`` on a CPU run; a price set on ``auto`` is kept. A datasheet
    option that is not the machine the run is on is refused (unless ``planning``: a plan is for the
    machine it names): its peak would say nothing about this run."""
    from costlab.measure.machine import visible_gpus

    hw = cfg.hardware  # its keys' types and ranges are checked already (costlab.schema)
    on_cpu = cfg.trainer.device == "cpu"
    gpus = visible_gpus()
    if hw.name != "auto":
        if on_cpu != (hw.name == "cpu") and not planning:  # a plan is for the machine it names
            where = "cpu" if on_cpu else f"cuda ({gpus[0].name})" if gpus else "cuda"
            raise ConfigError("hardware", hw.name, f"this run is on {where}; use hardware=auto"
                              + ("" if on_cpu else " or the option of its GPU"))
        return hw
    name = "cpu" if on_cpu else (match_gpu(gpus[0].name) if gpus else None)
    if name is None:
        chosen = OmegaConf.create({"name": gpus[0].name if gpus else "unknown", "peak_tflops": None,
                                   "usd_per_hour": None, "match": []})
    else:
        chosen = _option(name)
    for key in ("usd_per_hour", "usd_per_core_hour", "probe_cache"):
        if hw.get(key) is not None:
            chosen[key] = hw[key]
    return chosen


def device_peak(cfg: DictConfig, local_ranks: int, dtype: str) -> tuple[float | None, str]:
    """Peak TFLOP/s of one device in ``dtype`` (the run's matmul dtype, as the precision option says:
    :func:`costlab.precision.matmul_dtype`), and its source (or None and why not). On CPU the probe runs here
    with this process's threads (the node's cores, at the end of a run), and a rank's share is the node's
    peak divided among the ``local_ranks``."""
    hw = cfg.hardware
    if hw.name == "cpu":
        if dtype == "fp8":
            return None, "no fp8 matmuls on CPU"
        from pathlib import Path

        from costlab.measure.machine import cpu_info
        from costlab.measure.probes import cpu_peak_tflops

        cache = hw.get("probe_cache")
        tflops, source = cpu_peak_tflops(dtype, Path(cache) if cache else None, cpu_info())
        return tflops / local_ranks, source + (f", shared by {local_ranks} ranks" if local_ranks > 1 else "")
    peaks = hw.get("peak_tflops")
    if not peaks:
        return None, f"no datasheet peak for this GPU ({hw.name}): add a conf/hardware option that matches it"
    if peaks.get(dtype) is None:
        return None, f"hardware={hw.name} has no {dtype} peak"
    return float(peaks[dtype]), f"datasheet: hardware={hw.name}"


def mfu_tag(cost: dict[str, float], peak_tflops: float | None, source: str) -> dict[str, str]:
    """Where the peak behind ``perf/mfu`` came from, or why ``cost`` (:func:`cost_metrics`) has no MFU."""
    if MFU in cost:
        return {PEAK_SOURCE_TAG: source}
    if peak_tflops is None:
        return {NO_MFU_TAG: source}
    if TFLOPS_PER_DEVICE in cost:
        return {NO_MFU_TAG: f"the run exceeded the peak ({source}): probes under load underestimate it; "
                            "later runs keep the best probe"}
    return {NO_MFU_TAG: "no timed training steps"}


def cost_and_mfu(cfg: DictConfig, flops: float, local_ranks: int, dtype: str, train_tps: float | None,
                 infer_tps: float | None, serve_tps: float | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`cost_metrics` at the device's peak in ``dtype`` (:func:`device_peak`: on CPU its probe runs
    now), and the tag of :func:`mfu_tag`."""
    peak, source = device_peak(cfg, local_ranks, dtype)
    cost = cost_metrics(cfg, flops, peak, train_tps, infer_tps, serve_tps)
    return cost, mfu_tag(cost, peak, source)
