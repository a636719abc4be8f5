"""``python run.py --help`` opens with costlab's own description, groups and keys, not only Hydra's."""

import subprocess
import sys

from costlab import ROOT


def test_help_describes_costlab_its_groups_and_keys():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith("costlab: what does each LLM cost lever really buy?")
    assert "precision: bf16, fp16, fp32, fp8" in out and "experiment: compression_study" in out
    assert "optimized_metric" in out and "report.baseline" in out
