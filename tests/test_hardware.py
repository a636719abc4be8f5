"""What costlab reads about the machine: the CPU's model and features from /proc/cpuinfo text (excerpts
of an AVX2-only EPYC, an AVX-512 EPYC and a Xeon with AMX), and the warning a CPU without native
bf16/fp16 matmuls gets before launch, with the slowdown a real probe measured."""

from __future__ import annotations

import re

import pytest

from costlab.measure.machine import Cpu, cpu_info, parse_cpuinfo
from costlab.measure.probes import matmul_gflops, slow_precision_warning
from tests.conftest import TINY, compose_config

AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr pae mce sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 rdseed
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu avx2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
GENOA = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 vaes
"""


def test_cpuinfo_features_are_parsed_per_machine():
    assert parse_cpuinfo(AVX2_EPYC) == Cpu("AMD EPYC", frozenset({"avx2"}), known=True)
    spr = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert spr.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert spr.features == {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx", "amx_bf16"}
    assert parse_cpuinfo(GENOA).features == {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
    assert parse_cpuinfo(GENOA).tags() == {"costlab.cpu.model": "AMD EPYC 9654 96-Core Processor",
                                           "costlab.cpu.features": "avx2,avx512_bf16,avx512_vnni,avx512f"}


def test_native_precisions_follow_the_features():
    avx2, genoa, spr = parse_cpuinfo(AVX2_EPYC), parse_cpuinfo(GENOA), parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert avx2.lacks_native("bfloat16") == ("avx512_bf16", "amx_bf16") and avx2.lacks_native("float16")
    assert not genoa.lacks_native("bfloat16") and genoa.lacks_native("float16")
    assert not spr.lacks_native("bfloat16") and not spr.lacks_native("float16")
    assert not avx2.lacks_native("float32")


def test_without_cpuinfo_nothing_is_assumed(tmp_path):
    cpu = cpu_info(tmp_path / "absent")
    assert not cpu.known and cpu.model and cpu.features == frozenset()
    assert not cpu.lacks_native("bfloat16")  # unknown features: no warning rather than a wrong one
    assert cpu.tags()["costlab.cpu.features"] == "unknown"
    assert not parse_cpuinfo("processor : 0\n").known  # a cpuinfo without flags (some ARM kernels)


def test_this_machines_cpu_is_read():
    cpu = cpu_info()
    assert cpu.known and cpu.model  # CI runs on Linux x86
    assert "avx2" in cpu.features


def test_bf16_on_a_cpu_without_bf16_is_warned_with_a_measured_slowdown():
    cfg = compose_config([*TINY, "trainer.device=cpu", "precision=bf16"])
    warning = slow_precision_warning(cfg, parse_cpuinfo(AVX2_EPYC))
    assert warning is not None and warning.count("\n") == 0
    assert "precision=bf16" in warning and "AMD EPYC" in warning and "avx512_bf16/amx_bf16" in warning
    fast, slow = map(float, re.search(r"\(([\d.]+) vs ([\d.]+) GFLOP/s", warning).groups())
    assert fast > 0 and slow > 0  # measured here, whatever this CPU is
    assert slow_precision_warning(cfg, parse_cpuinfo(GENOA)) is None  # native bf16: no warning
    fp16 = compose_config([*TINY, "trainer.device=cpu", "precision=fp16"])
    assert "avx512_fp16/amx_fp16" in slow_precision_warning(fp16, parse_cpuinfo(GENOA))
    assert slow_precision_warning(fp16, parse_cpuinfo(SAPPHIRE_RAPIDS)) is None
    fp32 = compose_config([*TINY, "trainer.device=cpu"])
    assert slow_precision_warning(fp32, parse_cpuinfo(AVX2_EPYC)) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_probe_measures_a_rate(dtype):
    assert matmul_gflops(dtype, n=64, min_s=0.01) > 0
