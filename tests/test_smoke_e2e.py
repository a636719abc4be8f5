import pytest

from costlab.measure.energy import energy_counter
from costlab.measure.machine import cpu_info
from tests.conftest import TINY


@pytest.mark.e2e
def test_tiny_single_run_finishes_with_contract_metrics(cli):
    proc = cli(*TINY, "tracking.run_name=smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cli.run_by_name("smoke")
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in cpu_info().tags()} == cpu_info().tags()
    m = run.data.metrics
    for key in ("eval/loss", "perf/tokens_per_s", "mem/peak_bytes", "model/size_bytes", "infer/tokens_per_s"):
        assert key in m
    # the cost model: this CPU's measured peak, and money from the logged throughputs and price
    assert run.data.tags["hardware"] == "cpu" and run.data.tags["costlab.peak_source"].startswith("cpu probe")
    assert m["perf/flops_per_token"] > 0 and 0 < m["perf/mfu"] <= 1
    assert m["perf/tflops_per_device"] == pytest.approx(m["perf/flops_per_token"] * m["perf/tokens_per_s"] / 1e12)
    per_hour = m["cost/usd_per_hour"]
    assert m["cost/usd_per_1m_train_tokens"] == pytest.approx(per_hour / (m["perf/tokens_per_s"] * 3600) * 1e6)
    assert m["cost/usd_per_1m_infer_tokens"] == pytest.approx(per_hour / (m["infer/tokens_per_s"] * 3600) * 1e6)
    assert m["cost/usd_run"] == pytest.approx(per_hour * m["time/total_s"] / 3600)
    counter, why = energy_counter("cpu", 0, 1)
    if counter is None:  # no estimate stands in for a measurement: the reason is logged instead
        assert run.data.tags["costlab.energy_missing"] == why and "energy/joules_per_token_train" not in m
    else:
        assert m["energy/joules_per_token_train"] > 0 and run.data.tags["costlab.energy_source"].startswith("rapl")
    for part in ("params", "grads", "optimizer"):  # the memory model, predicted before the worker joined
        assert m[f"mem/predicted_{part}_bytes_per_rank"] == pytest.approx(m[f"mem/{part}_bytes_per_rank"], rel=0.02)
