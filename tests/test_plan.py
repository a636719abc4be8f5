"""``mode=plan``: a 7B-class configuration planned on this CPU-only machine in seconds, without
allocating its weights, and logged as a run of its own."""

from __future__ import annotations

import resource
import time

import pytest

from costlab.measure.memory import predict_state
from costlab.training.optimizers import build_optimizer
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
    # the time model's step (no assumed MFU): the MFU it implies, the hours and dollars it takes
    tps = m["plan/tokens_per_s"]
    assert m["plan/mfu"] == pytest.approx(m["plan/flops_per_token"] * tps / 8 / (hw.peak_tflops.bf16 * 1e12))
    assert 0.05 < m["plan/mfu"] < 0.8 and "plan/mfu_assumed" not in m
    assert m["plan/step_time_ms"] == pytest.approx(1000 * t.batch_size * cfg.model.block_size / tps, rel=1e-6)
    assert m["plan/hours"] == pytest.approx(tokens / tps / 3600)
    assert m["plan/usd"] == pytest.approx(hw.usd_per_hour * 8 * m["plan/hours"])
    assert "PREDICTED: MFU" in proc.stderr and "fits" in proc.stderr
    assert "fitted on llm-foundry" in run.data.tags["costlab.time_model"]
    assert not (cli.out / "run" / "worker.log").exists()  # no worker was started


@pytest.mark.slow
@pytest.mark.e2e
def test_a_plan_that_does_not_fit_says_so(cli):
    proc = cli("mode=plan", "model=llama_7b", "hardware=l4", "tracking.run_name=plan_l4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stderr  # 7B x 16 bytes of state on one 24 GB card
    assert cli.run_by_name("plan_l4").data.metrics["plan/memory_margin_bytes"] < 0


@pytest.mark.e2e
def test_a_plan_says_nothing_of_the_training_metric_it_never_logs(cli):
    """Only a search reads a job's optimized_metric (default eval/loss, which a plan never logs): a plan run alone
    prints its verdict and no warning."""
    proc = cli(*TINY, "mode=plan", "tracking.run_name=quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PREDICTED" in proc.stderr and "costlab: warning" not in proc.stderr, proc.stderr[-3000:]
    assert cli.run_by_name("quiet").info.status == "FINISHED"


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
    # the same memory (fp8 is planned with bf16 autocast around the float8 Linears), no more time
    assert out["plan/memory_bytes_per_device"] == bf16["plan/memory_bytes_per_device"]
    assert out["plan/hours"] <= bf16["plan/hours"]  # equal here: a tiny model waits on its host, not its matmuls
    # at an assumed MFU (plan.mfu: the override of the time model), twice the peak is half the time
    fp8_at, bf16_at = (make_plan(compose_config([*o, "plan.mfu=0.4"]))[0]
                       for o in (overrides, [*overrides[:-1], "precision=bf16"]))
    assert fp8_at["plan/hours"] == pytest.approx(bf16_at["plan/hours"] / 2, rel=0.01)
    assert fp8_at["plan/mfu_assumed"] == 0.4 and "plan/tokens_per_s" not in fp8_at
    assert refusal(*overrides[:4], "hardware=a100_80gb", "precision=fp8").key == "precision"
    assert "a100_80gb" in str(refusal(*overrides[:4], "hardware=a100_80gb", "precision=fp8"))
    assert "model=hf" in str(refusal("model=hf", "model.config=llama_tiny", "precision=fp8"))


def test_a_plan_times_and_prices_the_tokens_it_is_given():
    from costlab.launcher.plan import make_plan

    base = ["mode=plan", "model=gpt2_small", "hardware=h100_sxm", "parallelism=fsdp", "trainer.nproc_per_node=8"]
    steps, _ = make_plan(compose_config(base))
    out, lines = make_plan(compose_config([*base, "plan.tokens=1e12"]))
    assert "model=gpt2_small (124M parameters)" in lines[0]  # GPT-2 small, as it is known
    assert out["plan/tokens"] == 1e12 and "(plan.tokens)" in lines[-1] and "days" in lines[-1]
    assert out["plan/hours"] == pytest.approx(steps["plan/hours"] * 1e12 / steps["plan/tokens"])
    assert out["plan/usd"] == pytest.approx(out["plan/hours"] * 8 * compose_config(base).hardware.usd_per_hour)
    assert refusal(*base, "plan.tokens=-5").key == "plan.tokens"


def test_a_deep_model_is_laid_out_at_two_depths_exactly():
    """A plan lays a deep model out at one and two layers per pipeline stage and scales the difference: the same
    bytes as laying out every layer, for FSDP, a pipeline (interleaved too), 2-D and a Hugging Face model."""
    from costlab.measure.memory import _layout_state, predict_layout_state
    from costlab.parallelism.dims import parallel_dims

    gpt = ["model.n_head=2", "model.n_embd=32", "model.block_size=32", "trainer.device=cpu"]
    for overrides, world in [([*gpt, "model.n_layer=8", "parallelism=fsdp"], 2),
                             ([*gpt, "model.n_layer=8", "parallelism=pp"], 2),
                             ([*gpt, "model.n_layer=12", "parallelism=pp", "parallelism.schedule=interleaved_1f1b"], 2),
                             (["model=hf", "model.config=llama_tiny", "parallelism=fsdp_tp", "trainer.device=cpu"], 4)]:
        cfg = compose_config(overrides)
        full = _layout_state(cfg, parallel_dims(cfg.parallelism, world), world)
        assert predict_layout_state(cfg, world) == pytest.approx(full, rel=1e-9), overrides


def test_the_middle_pipeline_ranks_are_laid_out_once_for_all():
    """A layout's state is read on the first, the second and the last pipeline rank only (every rank between holds
    its layers alike): the same largest bytes as laying out every rank of the world, for a pipeline of four
    (interleaved too, and with FSDP inside each stage), a tied GPT and a Hugging Face model."""
    from costlab.measure.memory import _layout_state, _rank_state
    from costlab.parallelism.dims import parallel_dims

    gpt = ["model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.n_layer=8", "trainer.device=cpu",
           "parallelism=pp"]
    for overrides, world in [(gpt, 4), ([*gpt, "+model.tie_weights=false"], 4),
                             ([*gpt, "parallelism.schedule=interleaved_1f1b"], 4),
                             ([*gpt, "parallelism.pp_degree=4", "parallelism.dp_shard=2"], 8),
                             (["model=hf", "model.config=llama_tiny", "parallelism=pp", "trainer.device=cpu"], 4)]:
        cfg = compose_config(overrides)
        dims = parallel_dims(cfg.parallelism, world)
        every = [_rank_state(cfg, dims, rank, world) for rank in range(world)]
        assert dims.pp == 4 and len({tuple(s.values()) for s in every}) > 1, overrides  # the ranks differ
        largest = {key: max(s[key] for s in every) for key in every[0]}
        assert _layout_state(cfg, dims, world) == largest, overrides


def test_hsdp_holds_one_replicas_shards_and_all_reduces_them_across_the_nodes():
    """HSDP (dp_replicate x dp_shard, FSDP2 on a two-dimensional mesh): a rank holds what FSDP over dp_shard ranks
    holds, with a pipeline or not; on two nodes of eight, its gathers and reduce-scatters stay inside a node as one
    node's FSDP does, and each layer's gradient shard is all-reduced with the other node's, over the network."""
    import math

    from costlab.launcher.plan import predict_time
    from costlab.measure.cardrates import gpu_rates
    from costlab.measure.memory import _layout_state
    from costlab.models.gpt import build_model
    from costlab.models.meta import on_meta
    from costlab.parallelism.dims import parallel_dims

    gpt = ["model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.n_layer=4", "trainer.device=cpu"]
    for hsdp, fsdp, worlds in [(["parallelism=hsdp"], ["parallelism=fsdp"], (4, 2)),
                               (["parallelism=pp", "parallelism.dp_replicate=2", "parallelism.dp_shard=2"],
                                ["parallelism=pp", "parallelism.dp_shard=2"], (8, 4))]:
        states = [_layout_state(cfg, parallel_dims(cfg.parallelism, world), world)
                  for cfg, world in ((compose_config([*gpt, *hsdp]), worlds[0]),
                                     (compose_config([*gpt, *fsdp]), worlds[1]))]
        assert states[0] == states[1], hsdp

    base = ["mode=plan", "model=llama_7b", "model.block_size=2048", "hardware=h100_sxm", "precision=bf16",
            "trainer.activation_checkpointing=full", "trainer.nproc_per_node=8"]
    one = compose_config([*base, "parallelism=fsdp", "trainer.batch_size=8"])
    two = compose_config([*base, "parallelism=hsdp", "parallelism.dp_shard=8", "trainer.nnodes=2",
                          "trainer.batch_size=16"])
    assert parallel_dims(two.parallelism, 16).dp_replicate == 2
    rates = gpu_rates(one, "bf16")

    def data_parallel(cfg, world) -> float:
        step, _ = predict_time(cfg, world)
        exposed, hidden = step.parts["exposed_data_parallel"], step.parts["overlapped_data_parallel"]
        return exposed + (step.parts["compute"] if exposed else hidden / rates.overlap_cost)

    with on_meta():
        trained = sum(p.numel() for p in build_model(one.model).parameters())
    fixed, bandwidth = rates.inter["all_reduce"]  # two ranks, one on each node: one NIC each
    all_reduce = (int(one.model.n_layer) + 1) * fixed + 2 * (2 - 1) / 2 * 4 * trained / 8 / bandwidth
    assert data_parallel(two, 16) == pytest.approx(data_parallel(one, 8) + all_reduce, rel=1e-6)
    assert not math.isclose(all_reduce, 0.0)


def test_a_gpu_plan_prices_its_collectives_on_the_links_they_cross():
    """The GPU time model: datasheet rates times the calibrated shares; FSDP over two nodes crosses the network
    (slower than NVLink inside one), and its collectives overlap the compute, so only what sticks out is added."""
    from costlab.launcher.plan import predict_time
    from costlab.measure.cardrates import GPU_CALIBRATION, gpu_rates

    base = ["mode=plan", "model=llama_7b", "model.block_size=2048", "hardware=h100_sxm", "parallelism=fsdp",
            "precision=bf16", "trainer.activation_checkpointing=full"]
    one = compose_config([*base, "trainer.nproc_per_node=8", "trainer.batch_size=8"])
    two = compose_config([*base, "trainer.nnodes=2", "trainer.nproc_per_node=8", "trainer.batch_size=16"])
    rates = gpu_rates(one, "bf16")
    hw = one.hardware
    assert rates.matmul_flops == pytest.approx(hw.attainable_tflops.bf16 * 1e12 * GPU_CALIBRATION.matmul)
    assert rates.bytes_per_s == pytest.approx(hw.memory_bandwidth_gbps * 1e9 * GPU_CALIBRATION.memory)
    assert rates.link["all_gather"][1] > rates.inter["all_gather"][1]  # NVLink beside one NIC
    inside, _ = predict_time(one, 8)
    across, _ = predict_time(two, 16)
    # the same work per GPU (one sequence each): compute alike, the collectives no faster across nodes
    assert across.parts["compute"] == pytest.approx(inside.parts["compute"], rel=1e-6)
    assert across.step_s >= inside.step_s
    small = compose_config([*base, "model=gpt2_small", "model.block_size=1024", "trainer.nnodes=4",
                            "trainer.nproc_per_node=8", "trainer.batch_size=32"])
    step, _ = predict_time(small, 32)
    assert step.parts["exposed_data_parallel"] >= 0 and step.step_s >= step.parts["compute"]


def test_fsdp_reduces_every_accumulated_micro_batch_and_its_hidden_collectives_still_cost_a_share():
    """FSDP2 reduce-scatters each accumulated micro-batch's gradients (the trainer leaves its gradient sync on), so
    its collectives grow with the accumulation as its compute does; DDP all-reduces once a step. On a GPU the
    collectives hidden beside the compute still cost the step the calibrated share of their seconds."""
    from costlab.launcher.plan import predict_time
    from costlab.measure.cardrates import GPU_CALIBRATION

    base = ["mode=plan", "model=llama_7b", "model.block_size=2048", "hardware=h100_sxm", "precision=bf16",
            "trainer.activation_checkpointing=full", "trainer.nproc_per_node=8"]
    hidden = {}
    for layout in ("fsdp", "ddp"):
        for accum in (1, 4):
            cfg = compose_config([*base, f"parallelism={layout}", f"trainer.batch_size={8 * accum}",
                                  f"trainer.grad_accum_steps={accum}"])
            step, _ = predict_time(cfg, 8)
            assert step.parts["exposed_data_parallel"] == 0  # the compute is longer than the collectives
            hidden[layout, accum] = step.parts["overlapped_data_parallel"] / GPU_CALIBRATION.overlap_cost
            assert hidden[layout, accum] > 0
    assert hidden["fsdp", 4] == pytest.approx(4 * hidden["fsdp", 1], rel=1e-9)  # gathers and reduce-scatter
    assert hidden["ddp", 4] == pytest.approx(hidden["ddp", 1], rel=1e-9)  # one all-reduce, after the last
    assert 0 < GPU_CALIBRATION.overlap_cost <= 1


def test_fused_attention_runs_at_the_cards_published_rate_or_says_it_assumed_one():
    """A card's fused attention is priced at its option's published FlashAttention-2 rate times the calibrated
    share; a card that names none takes the A100's attention over matmul ratio, and its tag says ASSUMED. Hopper's
    published attention reaches a smaller share of its matmul rate than Ampere's."""
    from costlab.measure.cardrates import GPU_CALIBRATION, attention_over_matmul, gpu_rates

    def rates(card: str):
        return gpu_rates(compose_config([*TINY, "mode=plan", f"hardware={card}"]), "bf16")

    h100, a100 = rates("h100_sxm"), rates("a100_80gb")
    hw = compose_config([*TINY, "mode=plan", "hardware=h100_sxm"]).hardware
    assert h100.attention_flops == pytest.approx(hw.attention_tflops * 1e12 * GPU_CALIBRATION.attention)
    assert "attention published" in h100.source
    assert h100.attention_flops / h100.matmul_flops < a100.attention_flops / a100.matmul_flops
    pcie = compose_config([*TINY, "mode=plan", "hardware=h100_pcie"]).hardware
    assert "attention_tflops" not in pcie or pcie.attention_tflops is None
    unnamed = rates("h100_pcie")
    assert unnamed.attention_flops == pytest.approx(pcie.peak_tflops.bf16 * 1e12 * attention_over_matmul()
                                                    * GPU_CALIBRATION.attention)
    assert "attention ASSUMED" in unnamed.source


def test_fp32_on_a_gpu_runs_no_kernel_above_its_fp32_peak_and_fp8_keeps_bf16_attention():
    """fp32 matmuls run on the CUDA cores (PyTorch leaves TF32 off) and have no flash kernel: a plan prices them at
    the fp32 peak times bf16's attainable share of its peak, and their attention at the card's attention over
    matmul ratio of that, never at FlashAttention-2's bf16 rate (5x the H100's fp32 peak). fp8 training keeps its
    attention in bf16, on a card that publishes an attention rate and on one that does not."""
    from costlab.launcher.plan import make_plan
    from costlab.measure.cardrates import GPU_CALIBRATION, gpu_rates
    from costlab.measure.names import PLAN_MFU

    for card in ("h100_sxm", "a100_80gb", "h100_pcie"):
        cfg = compose_config([*TINY, "mode=plan", f"hardware={card}"])
        hw, fp32 = cfg.hardware, gpu_rates(cfg, "fp32")
        peak = hw.peak_tflops.fp32 * 1e12
        assert fp32.attention_flops < fp32.matmul_flops <= peak * GPU_CALIBRATION.matmul, card
        if hw.get("attainable_tflops"):
            share = hw.attainable_tflops.bf16 / hw.peak_tflops.bf16
            assert fp32.matmul_flops == pytest.approx(peak * share * GPU_CALIBRATION.matmul), card
            assert "ASSUMED" in fp32.source
        if "fp8" in hw.peak_tflops:
            assert gpu_rates(cfg, "fp8").attention_flops == pytest.approx(gpu_rates(cfg, "bf16").attention_flops)
    plan = compose_config(["mode=plan", "model=llama_7b", "model.block_size=2048", "hardware=h100_sxm",
                           "parallelism=fsdp", "precision=fp32", "trainer.activation_checkpointing=full",
                           "trainer.nproc_per_node=8", "trainer.batch_size=8"])
    figures, _ = make_plan(plan)
    hw = plan.hardware
    # no FLOP runs faster than the matmuls: the model's FLOPs reach at most their share of the fp32 peak (91 % before)
    assert 0 < figures[PLAN_MFU] < hw.attainable_tflops.bf16 / hw.peak_tflops.bf16 * GPU_CALIBRATION.matmul


def test_a_gpu_run_without_its_cards_probes_predicts_its_step_as_its_plan_does():
    """A run on a GPU whose card could not be probed (a probe failed on a rank) logs ``perf/predicted_tokens_per_s``
    from its card's calibrated rates, the same figure its plan gives and logs as ``perf/planned_tokens_per_s``
    (computed here without a GPU: the prediction needs the card's option, not the card); a card with no memory
    bandwidth (an unknown GPU) gets a tag that says there is none. (With the card's probes:
    ``tests/test_steptime.py``.)"""
    from costlab.launcher.plan import predict_time
    from costlab.measure.steptime import PLANNED_TOKENS_PER_S, PREDICTED_TOKENS_PER_S, TIME_MODEL_TAG, predicted_metrics
    from costlab.training.optimizers import build_optimizer

    overrides = ["model=gpt2_small", "hardware=h100_sxm", "parallelism=fsdp", "trainer.nproc_per_node=8",
                 "precision=bf16"]
    run = compose_config([*overrides, "trainer.device=cuda"])
    figures, tag = predicted_metrics(run, 8, None, build_optimizer, "bf16")
    planned, _ = predict_time(compose_config(["mode=plan", *overrides]), 8)
    assert figures[PREDICTED_TOKENS_PER_S] == pytest.approx(planned.tokens_per_s, rel=1e-9)
    assert figures[PLANNED_TOKENS_PER_S] == pytest.approx(planned.tokens_per_s, rel=1e-9)
    assert "hardware=h100_sxm" in tag[TIME_MODEL_TAG] and "fitted on llm-foundry's A100 80GB" in tag[TIME_MODEL_TAG]
    unknown = compose_config([*overrides, "trainer.device=cuda", "hardware.memory_bandwidth_gbps=null"])
    assert predicted_metrics(unknown, 8, None, build_optimizer, "bf16") == (
        {}, {TIME_MODEL_TAG: "no prediction: hardware=h100_sxm names no memory bandwidth or bf16 peak"})


def test_a_cpu_plan_probes_a_small_model_as_a_run_does_and_times_a_large_one_in_seconds(monkeypatch):
    """A plan on this CPU probes the run's own model plain on its micro-batch (a small model's step is its ops' fixed
    costs, which the matmul and op probes alone under-count 2.4x on gpt_nano), once per micro-batch and model in a
    process whatever the layout; a 7B that does not fit this machine gets no model probe, and its matmul shapes are
    timed on at most PLAN_MATMUL_TOKENS tokens (at its 131,072-token micro-batch the probe took minutes)."""
    import torch.distributed as dist

    from costlab.launcher import plan as plan_module
    from costlab.launcher.plan import predict_time
    from costlab.measure import planprobes, stepprobes
    from costlab.measure.names import PLAN_MARGIN, PLAN_TOKENS_PER_S
    from costlab.measure.planprobes import PLAN_MATMUL_TOKENS

    probed: list[int] = []  # the model probes (the layout's, under a fake process group, are another test's)
    depth_seconds = stepprobes.depth_seconds

    def counted(*args, **kwargs):
        if not dist.is_initialized():
            probed.append(1)
        return depth_seconds(*args, **kwargs)

    monkeypatch.setattr(stepprobes, "depth_seconds", counted)
    planprobes._probe_model.cache_clear()
    small = [*TINY, "mode=plan", "hardware=cpu", "trainer.nproc_per_node=2"]
    ddp, rates = predict_time(compose_config([*small, "parallelism=ddp"]), 2)
    assert rates.model is not None and rates.model.layer_s > 0 and "two depths" in rates.source
    assert "in this one process with" in rates.source and ddp.step_s > 0
    assert "while 1 companion process timed the same" in rates.source  # the other rank of its node
    fsdp, again = predict_time(compose_config([*small, "parallelism=fsdp"]), 2)  # the same micro-batch per rank
    assert again.model == rates.model and len(probed) == 1
    _, plain = predict_time(compose_config([*small, "parallelism=ddp"]), 2, probe_model=False)
    assert plain.model is None

    rows: list[int] = []
    matmul_rate = stepprobes.matmul_rate

    def spy(m: int, *args, **kwargs) -> float:
        rows.append(m)
        assert m <= PLAN_MATMUL_TOKENS, f"a plan timed a {m}-token matmul"
        return matmul_rate(m, *args, **kwargs)

    monkeypatch.setattr(stepprobes, "matmul_rate", spy)
    big = compose_config(["mode=plan", "model=llama_7b", "model.n_layer=2", "model.n_embd=1024", "model.n_head=8",
                          "hardware=cpu"])
    figures, lines = plan_module.make_plan(big)
    assert figures[PLAN_MARGIN] < 0 and len(probed) == 1  # it does not fit: no model probe
    assert rows and figures[PLAN_TOKENS_PER_S] > 0, lines


def test_a_cpu_plan_runs_fsdp_and_tp_wrapping_as_rank_0_and_prices_collectives_on_the_link_runs_kept(tmp_path,
                                                                                                    monkeypatch,
                                                                                                    capsys):
    """A plan on this CPU has no peers. It lays the run's model out and runs it as the layout's rank 0 does, under
    PyTorch's fake process group, for what FSDP's and tensor parallel's wrapping costs (their hooks, copies and
    DTensor's Python; before, a CPU plan priced neither, and ranked FSDP first), once per layout in a process, and
    leaves no process group behind. It prices the collectives from the link probes that earlier runs of as many
    ranks here kept, where one did, and says what it could not price (also a wrapping whose probe failed)."""
    import torch.distributed as dist

    from costlab.launcher.plan import predict_time
    from costlab.measure import planprobes, timemodel
    from costlab.measure.machine import cpu_info
    from costlab.measure.probes import remember_link

    seen: list[tuple] = []
    layout_seconds = planprobes.layout_seconds

    def spy(cfg, world, build_optimizer, calls=None):
        seen.append((dist.get_backend(), dist.get_world_size(), dist.get_rank(), world))
        return layout_seconds(cfg, world, build_optimizer, calls)

    monkeypatch.setattr(planprobes, "layout_seconds", spy)
    planprobes._probe_layout.cache_clear()
    cache = tmp_path / "probes.json"
    small = [*TINY, "mode=plan", "hardware=cpu", "trainer.nproc_per_node=2", f"hardware.probe_cache={cache}"]
    fsdp, rates = predict_time(compose_config([*small, "parallelism=fsdp"]), 2)
    assert seen == [("fake", 2, 0, 2)] and not dist.is_initialized()
    assert rates.layout_layer_s > 0 and not rates.layout_peers and fsdp.parts["layout"] > 0
    assert fsdp.parts["communication"] == 0 and "no run of 2 ranks on this machine" in " ".join(fsdp.gaps)
    assert "without its peers" in " ".join(fsdp.gaps) and not rates.layout_calls["all_gather"][2]  # none a step

    link = {kind: (1e-4, 1e9) for kind in timemodel.COLLECTIVES}
    remember_link(cache, cpu_info(), 2, link)  # as a run of two ranks here keeps its probe
    again, priced = predict_time(compose_config([*small, "parallelism=fsdp"]), 2)
    assert len(seen) == 1 and priced.link == link  # the wrapping was probed once for the layout
    assert "the median of the probes of 1 earlier runs of 2 ranks here" in priced.source
    assert again.parts["layout"] == fsdp.parts["layout"] and again.parts["communication"] > 0
    assert not any("collectives not priced" in gap for gap in again.gaps)
    plain = timemodel.predict_step(compose_config([*small, "parallelism=fsdp"]), 2,
                                   timemodel.Rates(**{**vars(priced), "layout_layer_s": 0.0, "layout_outside_s": 0.0,
                                                      "layout_step_s": 0.0, "layout_probed": False}),
                                   build_optimizer)
    assert again.parts["communication"] == pytest.approx(plain.parts["communication"])  # gathers, reduce-scatters
    # FSDP2's collectives, counted as rank 0 issued them: each block's group gathered for its forward and again for
    # its backward (resharded after its forward), its gradients reduce-scattered once; the root's gathered once
    assert rates.layout_calls["all_gather"][:2] == (2, 1) and rates.layout_calls["reduce_scatter"][:2] == (1, 1)
    _each_counted_collective_pays_the_links_latency(compose_config([*small, "parallelism=fsdp"]), priced)

    tp, tp_rates = predict_time(compose_config([*small, "parallelism=tp"]), 2)
    assert len(seen) == 2 and tp.parts["layout"] > 0
    assert tp_rates.layout_calls["all_reduce"][0] >= 4  # a block's two forward and two backward at the least
    _each_counted_collective_pays_the_links_latency(compose_config([*small, "parallelism=tp"]), tp_rates)
    pp, _ = predict_time(compose_config([*small, "parallelism=pp"]), 2)
    assert len(seen) == 2 and "layout" not in pp.parts  # an unsharded pipeline's wrapping is its schedule's
    # DDP's reducer runs too, its buckets all-reduced by a hook that completes them locally; its all-reduce of the
    # gradients stays on the link model
    replicated = compose_config([*small, "parallelism=ddp", "trainer.grad_accum_steps=2"])
    ddp, ddp_rates = predict_time(replicated, 2)
    assert seen[2] == ("fake", 2, 0, 2) and not dist.is_initialized()
    assert ddp_rates.layout_probed and ddp_rates.layout_layer_s + ddp_rates.layout_outside_s > 0
    unwrapped = timemodel.predict_step(replicated, 2, timemodel.Rates(**{**vars(ddp_rates), "layout_probed": False}),
                                       build_optimizer)
    assert ddp.parts["communication"] == pytest.approx(unwrapped.parts["communication"])
    assert ddp.parts["communication"] > 0
    per_sync = replicated.model.n_layer * ddp_rates.layout_layer_s + ddp_rates.layout_outside_s  # one micro-batch
    assert ddp.parts["layout"] == pytest.approx(per_sync)
    assert len(ddp.gaps) == 1 and "without its peers" in ddp.gaps[0]

    # a layout the fake group cannot run costs the plan its wrapping only, and the plan says why
    _a_failed_probe_costs_the_plan_its_part(monkeypatch, capsys, small, "layout_seconds", planprobes._probe_layout,
                                            "fsdp", "layout")


def _each_counted_collective_pays_the_links_latency(cfg, rates) -> None:
    """A plan prices each collective its layout's probe counted at the link's latency, once per call: a step's
    communication grows by one latency per call counted in a step (the run's depth, its micro-batches)."""
    from costlab.measure import timemodel

    def communication(latency: float) -> float:
        link = {kind: (latency, bandwidth) for kind, (_, bandwidth) in rates.link.items()}
        return timemodel.predict_step(cfg, 2, timemodel.Rates(**{**vars(rates), "link": link}),
                                      build_optimizer).parts["communication"]

    layers, micro_batches = cfg.model.n_layer, cfg.trainer.grad_accum_steps
    per_step = sum(micro_batches * (layers * layer + outside) + step
                   for layer, outside, step in rates.layout_calls.values())
    assert per_step > 0 and communication(2e-3) - communication(1e-3) == pytest.approx(1e-3 * per_step)


def _a_failed_probe_costs_the_plan_its_part(monkeypatch, capsys, small: list[str], probe: str, cache,
                                            layout: str, part: str) -> None:
    """Where ``probe`` (looked up in planprobes, cached in ``cache``) cannot run under the fake group, a plan of
    ``layout`` still predicts, without ``part``, and says that its probe failed and, on stderr, why."""
    from costlab.launcher.plan import predict_time
    from costlab.measure import planprobes

    def broken(*args):
        raise RuntimeError(f"\nno {probe} under the fake group")  # PyTorch's messages can start on a new line

    monkeypatch.setattr(planprobes, probe, broken)
    cache.cache_clear()
    failed, rates = predict_time(compose_config([*small, f"parallelism={layout}"]), 2)
    assert not getattr(rates, f"{part}_probed") and part not in failed.parts and failed.tokens_per_s > 0
    assert "its probe under a fake process group failed here" in " ".join(failed.gaps)
    assert f"(RuntimeError: no {probe} under the fake group)" in capsys.readouterr().err


def test_a_cpu_plan_runs_a_pipelines_schedule_as_its_first_and_last_stages_ranks_alone(tmp_path, monkeypatch, capsys):
    """A plan on this CPU runs the pipeline's own schedule as the ranks of its first and last stages each run it,
    alone under PyTorch's fake process group (their stages' shapes given, not exchanged), and prices what it costs
    beyond their micro-batches; before, a plan priced no schedule. Its sends' fixed costs stay on the link the runs
    kept. A 2-D pipeline probes at two ranks in one process (DTensor's caches would hand the second the first's
    groups), and a schedule the fake group cannot run costs the plan that part only, said why."""
    import torch.distributed as dist

    from costlab.launcher.plan import predict_time
    from costlab.measure import planprobes, stepprobes, timemodel
    from costlab.measure.machine import cpu_info
    from costlab.measure.probes import remember_link

    seen: list[tuple] = []
    schedule_seconds = planprobes.schedule_seconds

    in_turn: list[bool] = []  # how each schedule probe timed the plain stage it takes off
    depth_seconds = stepprobes.depth_seconds

    def spy(cfg, env, build_optimizer):
        seen.append((dist.get_backend(), dist.get_world_size(), dist.get_rank(), env.rank))
        monkeypatch.setattr(stepprobes, "depth_seconds",
                            lambda *a, **k: in_turn.append(k.get("in_turn", True)) or depth_seconds(*a, **k))
        try:
            return schedule_seconds(cfg, env, build_optimizer)
        finally:
            monkeypatch.setattr(stepprobes, "depth_seconds", depth_seconds)

    monkeypatch.setattr(planprobes, "schedule_seconds", spy)
    planprobes._probe_schedule.cache_clear()
    cache = tmp_path / "probes.json"
    remember_link(cache, cpu_info(), 2, {kind: (1e-4, 1e9) for kind in timemodel.COLLECTIVES})
    small = [*TINY, "mode=plan", "hardware=cpu", "trainer.nproc_per_node=2", f"hardware.probe_cache={cache}"]
    pp, rates = predict_time(compose_config([*small, "parallelism=pp"]), 2)
    assert seen == [("fake", 2, 0, 0), ("fake", 2, 1, 1)] and not dist.is_initialized()
    assert in_turn == [False, False]  # in bursts, as the schedule runs its stages
    assert rates.schedule_probed and not rates.layout_peers and "schedule" in pp.parts
    assert "as the ranks of its first and last stages each run it alone" in rates.source
    assert len(pp.gaps) == 1 and "without their peers" in pp.gaps[0]
    unprobed = timemodel.predict_step(compose_config([*small, "parallelism=pp"]), 2,
                                      timemodel.Rates(**{**vars(rates), "schedule_probed": False, "schedule_s": 0.0}),
                                     build_optimizer)
    assert pp.parts["communication"] > 0  # its sends' latency too, as the link model prices it
    assert pp.parts["communication"] == pytest.approx(unprobed.parts["communication"])
    again, _ = predict_time(compose_config([*small, "parallelism=pp", "trainer.batch_size=16"]), 2)
    assert len(seen) == 2 and again.parts["schedule"] == pp.parts["schedule"]  # one short row per micro-batch

    looped, looped_rates = predict_time(compose_config([*small, "parallelism=pp",
                                                        "parallelism.schedule=interleaved_1f1b"]), 2)
    assert len(seen) == 4 and looped_rates.schedule_probed
    four = [*TINY, "mode=plan", "hardware=cpu", "trainer.nproc_per_node=4", "parallelism=pp",
            "parallelism.pp_degree=2", "parallelism.tp_degree=2"]
    _, tp_rates = predict_time(compose_config(four), 4)
    assert [s[2] for s in seen[4:]] == [0, 2] and tp_rates.schedule_probed, capsys.readouterr().err
    _a_failed_probe_costs_the_plan_its_part(monkeypatch, capsys, small, "schedule_seconds", planprobes._probe_schedule,
                                            "pp", "schedule")
