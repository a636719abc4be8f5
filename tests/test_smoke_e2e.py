import pytest

from costlab.hardware import cpu_info
from tests.conftest import TINY


@pytest.mark.e2e
def test_tiny_single_run_finishes_with_contract_metrics(cli):
    proc = cli(*TINY, "tracking.run_name=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cli.run_by_name("smoke")
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in cpu_info().tags()} == cpu_info().tags()
    for key in ("eval/loss", "perf/tokens_per_s", "mem/peak_bytes", "model/size_bytes", "infer/tokens_per_s"):
        assert key in run.data.metrics
