"""What a person sees: ``python run.py --help`` opens with costlab's own description, groups and keys, and a
run announces each of its phases."""

import subprocess
import sys

import pytest

from costlab import ROOT
from tests.conftest import TINY


def test_help_describes_costlab_its_groups_and_keys():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith("costlab: what does each LLM cost lever really buy?")
    assert "precision: bf16, fp16, fp32, fp8" in out and "experiment: compression_study" in out
    assert "optimized_metric" in out and "report.baseline" in out


@pytest.mark.slow
@pytest.mark.e2e
def test_a_run_announces_every_phase(cli):
    proc = cli(*TINY, "tracking.run_name=phases", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank(s) in" in proc.stderr  # the run id and folder, before the ranks start
    out = proc.stdout
    phases = ["loading data (synthetic)", "building gpt_nano and parallelising it (single, 1 rank(s))",
              "training 4 steps", "eta ", "compressing (if asked), measuring", "summary:"]
    positions = [out.find(p) for p in phases]
    assert -1 not in positions and positions == sorted(positions), out[-3000:]
