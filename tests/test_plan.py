"""``mode=plan``: a 7B-class configuration planned on this CPU-only machine in seconds, without
allocating its weights, and logged as a run of its own."""

from __future__ import annotations

import resource
import time

import pytest

from costlab.measure.memory import predict_state
from tests.conftest import TINY, compose_config, refusal


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


def test_a_plan_takes_fp8_for_an_hf_model_on_a_card_that_has_fp8():
    """A plan is for the card it names: fp8 is planned for a Hugging Face model on an H100 (its activations traced,
    its time at the fp8 peak); a card without fp8 is refused, and so is fp8 training of an hf model."""
    from costlab.launcher.job import check_job
    from costlab.launcher.plan import make_plan

    overrides = ["mode=plan", "model=hf", "model.config=llama_tiny", "model.block_size=64", "hardware=h100_sxm",
                 "parallelism=fsdp", "trainer.nproc_per_node=8", "precision=fp8"]
    cfg = compose_config(overrides)
    check_job(cfg, planning=True)
    out, lines = make_plan(cfg)
    assert "fp8 matmuls" in lines[0]
    assert out["mem/predicted_activations_bytes_per_rank"] > 0 and "activations" in lines[1]
    bf16 = make_plan(compose_config([*overrides[:-1], "precision=bf16"]))[0]
    # the same memory (fp8 is planned with bf16 autocast around the float8 Linears); twice the peak, half the time
    assert out["plan/memory_bytes_per_device"] == bf16["plan/memory_bytes_per_device"]
    assert out["plan/hours"] == pytest.approx(bf16["plan/hours"] / 2, rel=0.01)
    assert refusal(*overrides[:4], "hardware=a100_80gb", "precision=fp8").key == "precision"
    assert "a100_80gb" in str(refusal(*overrides[:4], "hardware=a100_80gb", "precision=fp8"))
    assert "model=hf" in str(refusal("model=hf", "model.config=llama_tiny", "precision=fp8"))


def test_a_plan_times_and_prices_the_tokens_it_is_given():
    from costlab.launcher.plan import make_plan

    base = ["mode=plan", "model=gpt2_small", "hardware=h100_sxm", "parallelism=fsdp", "trainer.nproc_per_node=8"]
    steps, _ = make_plan(compose_config(base))
    out, lines = make_plan(compose_config([*base, "plan.tokens=1e12"]))
    assert out["plan/tokens"] == 1e12 and "(plan.tokens)" in lines[-1] and "days" in lines[-1]
    assert out["plan/hours"] == pytest.approx(steps["plan/hours"] * 1e12 / steps["plan/tokens"])
    assert out["plan/usd"] == pytest.approx(out["plan/hours"] * 8 * compose_config(base).hardware.usd_per_hour)
    assert refusal(*base, "plan.tokens=-5").key == "plan.tokens"
