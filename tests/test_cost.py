"""The cost model: the FLOPs formula against PyTorch's FLOP counter, the CPU's peak measured here, the
datasheet options matched to GPU names, and the money figures as the formulas say."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import open_dict
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from costlab.measure.hardware import (
    USD_INFER,
    USD_RUN,
    USD_TRAIN,
    cost_metrics,
    device_peak,
    flops_per_token,
    match_gpu,
    resolve_hardware,
    run_cost,
)
from costlab.measure.machine import cpu_info
from costlab.measure.probes import LINK_HISTORY, cached_link, cpu_peak_tflops, remember_link
from costlab.models.gpt import build_model
from costlab.precision import matmul_dtype
from costlab.schema import ConfigError, check_config
from tests.conftest import TINY, compose_config

CPU = [*TINY, "trainer.device=cpu"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=32"],
        ["model=llama_nano", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16"],
        ["model=mlp", "model.hidden=48"],
    ],
    ids=["gpt", "llama", "mlp"],
)
def test_flops_per_token_is_what_the_flop_counter_counts(overrides):
    cfg = compose_config(["trainer.device=cpu", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    seq, batch = cfg.model.block_size, 2
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq))
    # the math attention kernel is plain bmm the counter sees (it has no formula for the fused CPU kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).float().square().mean().backward()  # forward and backward; the loss itself is not a matmul
    counted = counter.get_total_flops() / (batch * seq)
    assert flops_per_token(model, seq) == pytest.approx(counted, rel=1e-6)


def test_the_cpu_peak_is_the_best_probe_seen_on_this_machine(tmp_path):
    cache = tmp_path / "cpu_peak.json"
    tflops, source = cpu_peak_tflops("fp32", cache, cpu_info())
    assert tflops > 0 and "fp32 matmul" in source and "best of 1" in source
    (key, entry), = json.loads(cache.read_text()).items()
    assert entry["tflops"] == tflops
    # load only slows a probe down: a better figure on record stays, a worse one is replaced
    cache.write_text(json.dumps({key: {**entry, "tflops": 123.0}}))
    assert cpu_peak_tflops("fp32", cache, cpu_info()) == (123.0, source.replace("best of 1", "best of 2"))
    cache.write_text(json.dumps({key: {**entry, "tflops": 1e-9}}))
    assert cpu_peak_tflops("fp32", cache, cpu_info())[0] > 1e-9
    assert json.loads(cache.read_text())[key]["tflops"] > 1e-9


def test_a_runs_link_probe_is_kept_per_rank_count_and_a_plan_reads_the_median_of_the_last_few(tmp_path):
    """A CPU run's link probe is kept beside the CPU's peak, per number of ranks, the last LINK_HISTORY of them;
    a plan of as many ranks here reads each collective's median (it has no peers to probe the link with)."""
    cache, cpu = tmp_path / "cpu_peak.json", cpu_info()
    cpu_peak_tflops("fp32", cache, cpu)
    assert cached_link(cache, cpu, 2) is None and cached_link(None, cpu, 2) is None
    kinds = ("all_reduce", "all_gather", "reduce_scatter")
    for i in range(LINK_HISTORY + 2):  # the first two fall out of the history
        remember_link(cache, cpu, 2, {k: (1e-4 * (i + 1), 1e9 * (i + 1)) for k in kinds})
    remember_link(cache, cpu, 4, {"all_reduce": (9.0, 9.0)})
    link, runs = cached_link(cache, cpu, 2)
    middle = sorted(range(3, LINK_HISTORY + 3))[LINK_HISTORY // 2]  # the median of the probes kept
    assert runs == LINK_HISTORY and set(link) == set(kinds)
    assert link["all_gather"] == pytest.approx((1e-4 * middle, 1e9 * middle))
    assert cached_link(cache, cpu, 4) == ({"all_reduce": (9.0, 9.0)}, 1) and cached_link(cache, cpu, 8) is None
    assert "best of 2" in cpu_peak_tflops("fp32", cache, cpu)[1]  # the peak's history is kept beside


def test_gpu_names_match_their_datasheet_options():
    assert match_gpu("NVIDIA H100 80GB HBM3") == "h100_sxm"
    assert match_gpu("NVIDIA H100 PCIe") == "h100_pcie"
    assert match_gpu("NVIDIA H200") == "h200"
    assert match_gpu("NVIDIA A100-SXM4-40GB") == "a100_40gb"
    assert match_gpu("NVIDIA A100-SXM4-80GB") == "a100_80gb"
    assert match_gpu("NVIDIA L4") == "l4"
    assert match_gpu("Tesla T4") is None


def test_auto_is_this_cpu_with_its_price_and_overrides_survive():
    cfg = compose_config(CPU)
    hw = resolve_hardware(cfg)
    assert hw.name == "cpu" and hw.peak_tflops is None and hw.usd_per_core_hour > 0
    cfg = compose_config([*CPU, "hardware.usd_per_core_hour=0.5"])
    assert resolve_hardware(cfg).usd_per_core_hour == 0.5


def test_hardware_refusals_name_the_key():
    with pytest.raises(ConfigError) as e:
        resolve_hardware(compose_config([*CPU, "hardware=h100_sxm"]))
    assert e.value.key == "hardware" and "this run is on cpu" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_config(compose_config([*CPU, "hardware.usd_per_hour=-1"]))
    assert e.value.key == "hardware.usd_per_hour" and "at least 0" in str(e.value)


def test_gpu_peaks_come_from_the_datasheet_option_for_the_runs_dtype():
    cfg = compose_config([*CPU, "hardware=h100_sxm", "precision=bf16"])
    with open_dict(cfg):
        cfg.trainer.device = "cuda"  # device_peak only reads the config: no GPU is touched
    assert device_peak(cfg, 8, matmul_dtype(cfg)) == (cfg.hardware.peak_tflops.bf16, "datasheet: hardware=h100_sxm")
    with open_dict(cfg):
        cfg.precision.autocast_dtype = None
    assert device_peak(cfg, 8, matmul_dtype(cfg))[0] == cfg.hardware.peak_tflops.fp32
    with open_dict(cfg):
        cfg.hardware = {"name": "Tesla T4", "peak_tflops": None}
    peak, why = device_peak(cfg, 1, "fp32")
    assert peak is None and "no datasheet peak" in why


def test_money_is_price_times_devices_over_measured_throughput():
    cfg = compose_config([*CPU, "hardware=l4", "parallelism=ddp"])
    with open_dict(cfg):
        cfg.trainer.device = "cuda"
    out = cost_metrics(cfg, flops=6e6, peak_tflops=121.0, train_tps=50_000.0, infer_tps=200_000.0)
    assert out["perf/tflops_per_device"] == pytest.approx(6e6 * 50_000 / 2 / 1e12)
    assert out["perf/mfu"] == pytest.approx(out["perf/tflops_per_device"] / 121.0)
    price = cfg.hardware.usd_per_hour  # per device hour, as the option says
    assert out[USD_TRAIN] == pytest.approx(price * 2 / (50_000 * 3600) * 1e6)
    assert out[USD_INFER] == pytest.approx(price / (200_000 * 3600) * 1e6)
    assert run_cost(cfg, 1800.0) == {USD_RUN: pytest.approx(price * 2 / 2)}
    too_low = cost_metrics(cfg, flops=6e6, peak_tflops=1e-6, train_tps=50_000.0, infer_tps=None)
    assert "perf/mfu" not in too_low  # above the peak: the peak is wrong, and no MFU above 1 is logged
    out = cost_metrics(cfg, flops=6e6, peak_tflops=None, train_tps=None, infer_tps=None)
    assert set(out) == {"perf/flops_per_token", "cost/usd_per_hour"}  # nothing measured: nothing derived
