"""benchmarks/gpu_check.py, the one command that runs every GPU path once: its CPU dry run (which cases this
machine refuses, and why), its behaviour without a GPU, and the reserved-memory figure it reports."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from costlab import ROOT
from costlab.measure.metrics import hold_peaks, peak_memory_bytes, peak_reserved_memory, restart_peaks
from tests.conftest import has_cuda, requires_cuda

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# the cases whose kernels exist only on CUDA GPUs: float8 training, int4 and float8 quantization, 2:4 kernels
GPU_ONLY = {"fp8", "int4_weight_only", "fp8_quant", "semi_structured"}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def check(out: Path, *args: str, timeout: float = 120) -> dict:
    """Run the script as a user would; past ``timeout`` it gets SIGTERM (never SIGKILL), on which it stops
    its running case and writes what it has."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        _, err = proc.communicate()
        pytest.fail(f"gpu_check ran past {timeout}s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert (out / "gpu_check.md").is_file()
    return json.loads((out / "gpu_check.json").read_text())


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the table (from its header to the first line that is not a row), after checking every
    row has as many cells as the header."""
    text = markdown.splitlines()
    start = next(i for i, ln in enumerate(text) if ln.startswith("| case |"))
    lines = []
    for ln in text[start:]:
        if not ln.startswith("|"):
            break
        lines.append(ln)

    def cells(line: str) -> list[str]:
        assert line.startswith("|") and line.endswith("|"), line
        return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    header = cells(lines[0])
    assert header[:2] == ["case", "status"]
    assert all(re.fullmatch(r"-{3,}", c) for c in cells(lines[1])), lines[1]
    rows = [cells(ln) for ln in lines[2:]]
    assert all(len(r) == len(header) for r in rows), rows
    return rows


def test_cpu_dry_run_names_the_cases_that_need_a_gpu(tmp_path):
    data = check(tmp_path, "--cpu-dry-run")
    names = [c.name for c in load_script().CASES]
    assert data["mode"] == "cpu-dry-run"
    assert data["environment"]["torch"] == torch.__version__
    cases = {c["name"]: c for c in data["cases"]}
    assert list(cases) == names
    refused = {n for n, c in cases.items() if c["status"] != "valid on CPU"}
    assert refused == GPU_ONLY, {n: cases[n]["detail"] for n in refused ^ GPU_ONLY}
    for name in GPU_ONLY:
        assert cases[name]["status"] == "refused on CPU"
        assert "CUDA" in cases[name]["detail"], cases[name]["detail"]
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert [r[0] for r in rows] == names
    assert all(r[1].startswith(("valid on CPU", "refused on CPU: ")) for r in rows)


@pytest.mark.skipif(has_cuda(), reason="a CUDA GPU is visible: the check would run its cases")
def test_without_a_gpu_every_case_is_skipped(tmp_path):
    data = check(tmp_path)
    assert data["mode"] == "no-gpu"
    assert {c["status"] for c in data["cases"]} == {"skipped: no CUDA GPU visible"}
    rows = table_rows((tmp_path / "gpu_check.md").read_text())
    assert len(rows) == len(load_script().CASES)


def test_reserved_memory_is_a_gpu_figure_only():
    assert peak_reserved_memory(torch.device("cpu")) == {}
    held = hold_peaks(torch.device("cpu"))  # on CPU the resident set's peak so far, and no allocator's
    assert held.allocated == held.reserved == 0 and held.rss > 0


@pytest.mark.gpu
@requires_cuda
def test_what_runs_between_held_and_restarted_peaks_stays_out_of_the_runs_peaks():
    """The time model's probes run on the card after training: the run's peaks are those held before them and
    those of what follows, not the probes' own."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    trained = torch.ones(2**20, device=device)  # 4 MiB
    held = hold_peaks(device)
    probe = torch.ones(2**25, device=device)  # 128 MiB
    del probe
    restart_peaks(device)
    after = torch.ones(2**21, device=device)  # 8 MiB
    assert held.allocated >= trained.numel() * 4
    assert after.numel() * 4 <= peak_memory_bytes(device, held) < 2**27
    assert peak_reserved_memory(device, held)["mem/peak_reserved_bytes"] < 2**27


@pytest.mark.gpu
@requires_cuda
def test_reserved_memory_covers_what_was_allocated():
    device = torch.device("cuda")
    x = torch.ones(2**20, device=device)
    reserved = peak_reserved_memory(device)["mem/peak_reserved_bytes"]
    assert reserved >= torch.cuda.max_memory_allocated(device) >= x.numel() * x.element_size()


@pytest.mark.gpu
@requires_cuda
def test_the_check_runs_a_case_on_the_gpu(tmp_path):
    data = check(tmp_path, "--only", "bf16", timeout=600)
    assert data["mode"] == "gpu" and data["environment"]["card"]
    (case,) = data["cases"]
    assert case["status"] == "ok", case["error_tail"]
    m = case["metrics"]
    assert m["mem/peak_reserved_bytes"] >= m["mem/peak_bytes"] > 0
    assert m["perf/tflops_per_device"] > 0 and m["perf/predicted_tokens_per_s"] > 0
    # predicted from probes on the card (its model at two depths), planned from the card's option alone
    assert "probes on this card" in case["tags"]["costlab.time_model"], case["tags"]
    assert "the run's model probed plain on its micro-batch" in case["tags"]["costlab.time_model"]
    assert m["perf/planned_tokens_per_s"] > 0 and m["perf/planned_tokens_per_s"] != m["perf/predicted_tokens_per_s"]
