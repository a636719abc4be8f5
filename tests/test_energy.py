"""Energy counters: RAPL package counters read from a powercap tree (the kernel's file layout, written
here), wrap-around, the hook's window, and the reason logged where a machine has no counter."""

from __future__ import annotations

from pathlib import Path

import pytest

from costlab.measure.energy import TrainingEnergy, energy_counter, rapl_packages


def _domain(root: Path, name: str, uj: int, max_uj: int = 1_000_000_000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_sums_packages_skips_subdomains_and_unwraps(tmp_path):
    p0 = _domain(tmp_path, "intel-rapl:0", 5_000_000)
    p1 = _domain(tmp_path, "intel-rapl:1", 999_000_000)
    _domain(tmp_path, "intel-rapl:0:0", 1)  # the core sub-domain of package 0: already in its figure
    assert [p.name for p in rapl_packages(tmp_path)] == ["intel-rapl:0", "intel-rapl:1"]
    read, source = energy_counter("cpu", 0, 1, root=tmp_path)
    assert source == "rapl (intel-rapl:0, intel-rapl:1)"
    assert read() == 0
    (p0 / "energy_uj").write_text("7000000\n")  # +2 J
    (p1 / "energy_uj").write_text("500000\n")  # wrapped: +1.5 J
    assert read() == pytest.approx(3.5)


def test_without_a_counter_nothing_is_measured_and_the_reason_is_given(tmp_path):
    read, why = energy_counter("cpu", 0, 1, root=tmp_path)
    assert read is None and "no readable RAPL package counter" in why
    _domain(tmp_path, "intel-rapl:0", 1)
    read, why = energy_counter("cpu", 0, 2, root=tmp_path)
    assert read is None and "multi-node" in why


def test_the_window_is_the_timed_steps():
    readings = iter([10.0, 25.0])
    energy = TrainingEnergy(lambda: next(readings), warmup_steps=2, max_steps=5)
    for step in range(6):  # the trainer calls hooks before each step and once with max_steps
        energy(step)
    assert energy.joules == 15.0
    idle = TrainingEnergy(lambda: 1 / 0, warmup_steps=5, max_steps=5)  # no timed steps: never read
    for step in range(6):
        idle(step)
    assert idle.joules == 0


def test_inference_energy_divides_the_counter_by_the_tokens_of_the_timed_passes():
    import time

    import torch

    from costlab.measure.energy import inference_energy

    watts = 25.0  # a counter of constant power: joules = watts x seconds
    calls = []

    class Timed(torch.nn.Module):
        def forward(self, x):
            calls.append(time.perf_counter())
            time.sleep(0.01)
            return x

    batch = torch.zeros(4, 8, dtype=torch.long)
    t0 = time.perf_counter()
    per_token = inference_energy(Timed(), batch, lambda: watts * (time.perf_counter() - t0), min_s=0.2)
    timed = len(calls) - 1  # the first pass is the warm-up
    assert timed >= 10
    # every timed pass took >= 10 ms, and the loop stops soon after 0.2 s
    assert watts * 0.01 / batch.numel() <= per_token <= watts * 0.3 / timed / batch.numel()
