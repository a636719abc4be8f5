"""``mode=plan``: a 7B-class configuration planned on this CPU-only machine in seconds, without
allocating its weights, and logged as a run of its own."""

from __future__ import annotations

import resource
import time

import pytest

from costlab.measure.memory import predict_state
from tests.conftest import TINY, compose_config


@pytest.mark.slow
@pytest.mark.e2e
def test_a_7b_plan_on_8_h100s_predicts_without_allocating(cli):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    overrides = ["mode=plan", "model=llama_7b", "hardware=h100_sxm", "parallelism=fsdp", "trainer.nproc_per_node=8",
                 "precision=bf16", "trainer.activation_checkpointing=full", "tracking.run_name=plan7b"]
    proc = cli(*overrides)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 30
    peak_rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    run = cli.run_by_name("plan7b")
    m = run.data.metrics
    params = m["plan/params"]
    assert 6.5e9 < params < 7e9 and peak_rss < 0.1 * 4 * params  # far below its fp32 weights (27 GB)
    assert run.info.status == "FINISHED" and run.data.tags["mode"] == "plan" and run.data.tags["hardware"] == "h100_sxm"
    # FSDP over 8: fp32 parameters, gradients and two AdamW states, one eighth each
    assert m["plan/state_bytes_per_device"] == pytest.approx(16 * params / 8, rel=0.01)
    assert m["plan/memory_bytes_per_device"] > m["plan/state_bytes_per_device"]  # activations on top
    cfg = compose_config(overrides)  # the figures the plan was given, read as run.py composed them
    hw, t = cfg.hardware, cfg.trainer
    assert m["plan/memory_margin_bytes"] == pytest.approx(hw.memory_gb * 1e9 - m["plan/memory_bytes_per_device"])
    tokens = t.max_steps * t.batch_size * cfg.model.block_size  # the steps and global batch, at the context
    assumed = cfg.plan.mfu * hw.peak_tflops.bf16 * 1e12 * 8 / m["plan/flops_per_token"]
    assert m["plan/tokens_per_s_assumed"] == pytest.approx(assumed)
    assert m["plan/hours"] == pytest.approx(tokens / m["plan/tokens_per_s_assumed"] / 3600)
    assert m["plan/usd"] == pytest.approx(hw.usd_per_hour * 8 * m["plan/hours"])
    assert f"ASSUMED MFU of {cfg.plan.mfu:.0%}" in proc.stderr and "fits" in proc.stderr
    assert not (cli.out / "run" / "worker.log").exists()  # no worker was started


@pytest.mark.slow
@pytest.mark.e2e
def test_a_plan_that_does_not_fit_says_so(cli):
    proc = cli("mode=plan", "model=llama_7b", "hardware=l4", "tracking.run_name=plan_l4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stderr  # 7B x 16 bytes of state on one 24 GB card
    assert cli.run_by_name("plan_l4").data.metrics["plan/memory_margin_bytes"] < 0


def test_plan_mfu_is_checked(cli):
    proc = cli(*TINY, "mode=plan", "plan.mfu=1.5")
    assert proc.returncode == 2 and "plan.mfu=1.5" in proc.stderr and "Traceback" not in proc.stderr


def test_predicted_state_shrinks_with_the_shards():
    single = predict_state(compose_config([*TINY, "trainer.device=cpu"]), 1)
    fsdp = predict_state(compose_config([*TINY, "trainer.device=cpu", "parallelism=fsdp"]), 2)
    params = single["mem/predicted_params_bytes_per_rank"]
    assert single["mem/predicted_grads_bytes_per_rank"] == params
    assert fsdp["mem/predicted_params_bytes_per_rank"] == pytest.approx(params / 2, rel=0.02)


def test_a_plan_of_several_nodes_needs_no_rendezvous_endpoint():
    """A plan launches nothing, so it plans ``trainer.nnodes`` nodes without an endpoint; a training job is refused."""
    from costlab.launcher.job import check_job
    from costlab.schema import ConfigError

    plan = compose_config(["mode=plan", "model=gpt2_small", "hardware=h100_sxm", "parallelism=fsdp",
                           "trainer.nnodes=4", "trainer.nproc_per_node=8"])
    check_job(plan, planning=True)
    one_node = predict_state(compose_config(["model=gpt2_small", "parallelism=fsdp", "trainer.nproc_per_node=8"]), 8)
    four_nodes = predict_state(plan, 32)  # the plan's world: nodes x processes per node
    key = "mem/predicted_params_bytes_per_rank"
    assert four_nodes[key] == pytest.approx(one_node[key] / 4, rel=0.01)
    with pytest.raises(ConfigError, match="trainer.nnodes=4"):
        check_job(compose_config(["parallelism=fsdp", "trainer.nnodes=4", "trainer.nproc_per_node=8"]), planning=False)
