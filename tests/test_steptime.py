"""The time model's parts: the work it traces on fake tensors against independent counts, and how the layout's
collectives and bubble enter the step. (How close its tokens/s come to measured ones is a benchmark's business:
benchmarks/predictions.py.)"""

from __future__ import annotations

import pytest
import torch

from costlab.measure.hardware import flops_per_token
from costlab.measure.stepprobes import RankProbes, cpu_rates
from costlab.measure.timemodel import ModelProbe, Rates, layer_work, predict_step
from costlab.models.gpt import build_model
from costlab.training.optimizers import build_optimizer
from tests.conftest import HF_TINY, TINY, compose_config, spawn_ranks

RATES = Rates(matmul_flops=1e11, bytes_per_s=1e10, op_s=4e-6, view_s=2e-6,
              link={k: (3e-4, 2e9) for k in ("all_reduce", "all_gather", "reduce_scatter")}, source="test")


def _cfg(*extra: str):
    return compose_config([*TINY, "trainer.device=cpu", *extra])


@pytest.mark.parametrize("model", ["gpt_nano", "llama_nano"])
def test_traced_flops_are_the_cost_models_flops_per_token(model):
    """One micro-batch's forward and backward, composed from the one- and two-layer traces, does the training
    FLOPs per token the cost model counts (6N + attention) for every token."""
    cfg = _cfg(f"model={model}", "model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.block_size=32")
    rows = 4
    layer, outside = layer_work(cfg, rows, fsdp=False)
    with torch.device("meta"):
        expected = flops_per_token(build_model(cfg.model), 32) * rows * 32
    assert layer.flops * 3 + outside.flops == pytest.approx(expected, rel=1e-6)
    assert layer.ops > 50 and layer.bytes > 0


def test_full_checkpointing_adds_at_most_the_blocks_forward_again():
    """The recompute is traced as it runs: PyTorch's checkpoint stops rebuilding a block once the tensors its
    backward needs are back, so the block's last matmul (whose output nothing saved) is not redone."""
    base = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32"]
    plain, _ = layer_work(_cfg(*base), 4, fsdp=False)
    full, _ = layer_work(_cfg(*base, "trainer.activation_checkpointing=full"), 4, fsdp=False)
    assert plain.flops * 1.1 < full.flops < plain.flops * 4 / 3  # the forward is a third of forward and backward
    assert full.ops > plain.ops


def test_the_layout_decides_which_collectives_and_bubble_the_step_pays():
    single = predict_step(_cfg(), 1, RATES, build_optimizer)
    assert single.parts["communication"] == 0 and "bubble" not in single.parts
    assert single.step_s == pytest.approx(sum(single.parts.values()))
    cfg = _cfg()
    assert single.tokens_per_s == pytest.approx(cfg.trainer.batch_size * cfg.model.block_size / single.step_s)
    ddp = predict_step(_cfg("parallelism=ddp"), 2, RATES, build_optimizer)
    with torch.device("meta"):
        weights = sum(p.numel() for p in build_model(cfg.model).parameters())
    latency, bandwidth = RATES.link["all_reduce"]
    assert ddp.parts["communication"] == pytest.approx(latency + 4 * weights / bandwidth, rel=1e-6)  # 2(n-1)/n = 1
    # FSDP2 gathers each block's group and the root's apart, in forward and again in backward, and reduce-scatters
    # each once: every one of those collectives pays the link's fixed cost (before, one gather a pass paid it)
    instant = Rates(**{**vars(RATES), "link": {k: (3e-4, 1e30) for k in RATES.link}})
    fsdp = predict_step(_cfg("parallelism=fsdp"), 2, instant, build_optimizer)
    assert fsdp.parts["communication"] == pytest.approx(3 * (cfg.model.n_layer + 1) * 3e-4)
    pp = predict_step(_cfg("parallelism=pp"), 2, RATES, build_optimizer)
    micro = compose_config([*TINY, "parallelism=pp"]).parallelism.microbatches
    assert pp.parts["bubble"] == pytest.approx(pp.parts["compute"] / micro)  # (pp - 1) of the micro-batches' slots
    faster = predict_step(_cfg(), 1, Rates(**{**vars(RATES), "op_s": RATES.op_s / 2}), build_optimizer)
    assert faster.step_s < single.step_s


def test_a_logged_step_pays_the_losss_reduction_over_the_ranks_that_hold_parts_of_it():
    """Every ``trainer.log_every`` steps the trainer reduces the loss: a pipeline's last stage broadcasts it to the
    other stages, the data-parallel ranks all-reduce it. One number each: their fixed costs, which no probe of the
    layout or schedule holds; a step that logs nothing, or a layout with one data-parallel rank and one stage, pays
    none."""
    (ar, ar_bw), (ag, ag_bw) = RATES.link["all_reduce"], RATES.link["all_gather"]
    ddp = predict_step(_cfg("parallelism=ddp"), 2, RATES, build_optimizer)
    assert ddp.parts["loss_reduction"] == pytest.approx(ar + 4 / ar_bw)  # 2 (n-1)/n of 4 bytes, n = 2
    assert "loss_reduction" not in predict_step(_cfg("parallelism=tp"), 2, RATES, build_optimizer).parts
    assert "loss_reduction" not in predict_step(_cfg(), 1, RATES, build_optimizer).parts
    pp = predict_step(_cfg("parallelism=pp"), 2, RATES, build_optimizer)
    assert pp.parts["loss_reduction"] == pytest.approx(ag + 2 / ag_bw)  # the last stage's broadcast
    quarter = predict_step(_cfg("parallelism=ddp", "trainer.log_every=4"), 2, RATES, build_optimizer)
    assert quarter.parts["loss_reduction"] == pytest.approx(ddp.parts["loss_reduction"] / 4)
    assert quarter.step_s == pytest.approx(ddp.step_s - 3 * ddp.parts["loss_reduction"] / 4)


def test_the_optimizers_step_pays_the_op_rate_without_autograd_where_one_was_probed():
    """The optimizer's step (clipping and zeroing included) runs under no_grad: its ops pay the rate of an op chain
    without autograd where the probes timed one; the forward and backward keep the rate with autograd, and rates
    without it (a card's) price the step at that one."""
    from costlab.measure.timemodel import optimizer_work

    cfg = _cfg()
    base = predict_step(cfg, 1, RATES, build_optimizer)
    rates = Rates(**{**vars(RATES), "step_op_s": RATES.op_s / 4})
    cheaper = predict_step(cfg, 1, rates, build_optimizer)
    layer, outside, *_ = optimizer_work(cfg, build_optimizer)
    ops = cfg.model.n_layer * layer.ops + outside.ops
    assert ops > 100 and base.parts["optimizer"] - cheaper.parts["optimizer"] == pytest.approx(ops * RATES.op_s * 3 / 4)
    assert cheaper.parts["compute"] == base.parts["compute"]
    assert "1 us per op of the optimizer's step (no autograd)" in cheaper.tag(rates)


@pytest.mark.parametrize("option", ["fsdp", "tp", "ddp"])
def test_a_probed_wrapping_is_paid_per_layer_micro_batch_and_step(option):
    """With the run's own wrapping probed (:func:`costlab.measure.stepprobes.layout_seconds`), FSDP and tensor
    parallel pay it per layer and micro-batch and once per step; FSDP's collectives and TP's latencies are in it.
    DDP pays it for one micro-batch a step (the others run under ``no_sync``), its all-reduces in it. Unprobed (a
    GPU plan), or probed without the layout's peers (a CPU plan), they are priced on the link model."""
    cfg = _cfg(f"parallelism={option}", "trainer.grad_accum_steps=2")
    unprobed = predict_step(cfg, 2, RATES, build_optimizer)
    probed = predict_step(cfg, 2, Rates(**{**vars(RATES), "layout_layer_s": 2e-3, "layout_outside_s": 1e-3,
                                           "layout_step_s": 5e-3, "layout_probed": True}), build_optimizer)
    assert "layout" not in unprobed.parts
    synced = 1 if option == "ddp" else 2  # micro-batches a step that pay the wrapping
    assert probed.parts["layout"] == pytest.approx(synced * (cfg.model.n_layer * 2e-3 + 1e-3) + 5e-3)
    if option == "tp":  # the collectives' bytes remain, their latencies are the probe's (each micro-batch's)
        from costlab.measure.timemodel import tp_collectives

        latencies = 2 * sum(calls * RATES.link[kind][0]
                            for kind, calls, _ in tp_collectives(cfg, cfg.model, 1, cfg.model.n_layer, False, 2))
        assert probed.parts["communication"] == pytest.approx(unprobed.parts["communication"] - latencies)
    else:  # gathers and reduce-scatters, or DDP's bucketed all-reduces, of the real weights were timed whole
        assert unprobed.parts["communication"] > 0 and probed.parts["communication"] == 0
    assert probed.step_s == pytest.approx(sum(probed.parts.values()))
    # a plan's probe ran without the layout's peers (under a fake process group): its wrapping is paid as a run's,
    # and its collectives are priced on the link model whole, as unprobed
    alone = predict_step(cfg, 2, Rates(**{**vars(RATES), "layout_layer_s": 2e-3, "layout_outside_s": 1e-3,
                                          "layout_step_s": 5e-3, "layout_peers": False,
                                          "layout_probed": True}), build_optimizer)
    assert alone.parts["layout"] == probed.parts["layout"]
    assert alone.parts["communication"] == pytest.approx(unprobed.parts["communication"])
    assert alone.parts["communication"] > 0


def test_a_probed_model_prices_its_micro_batch_at_the_probes_seconds_and_splits_them_for_tensor_parallel():
    """With the run's own model probed plain on its micro-batch (:class:`costlab.measure.timemodel.ModelProbe`), a
    single rank's forward and backward cost what the probe measured per layer and outside; tensor parallel divides
    the matmuls and the bytes by its degree and keeps each op's fixed cost (every rank runs every op)."""
    cfg = _cfg("trainer.grad_accum_steps=2")
    rows = cfg.trainer.batch_size // cfg.trainer.grad_accum_steps
    layer, outside = layer_work(cfg, rows, fsdp=False)

    def seconds(w):  # its matmuls at the probe's rate, its ops' fixed costs, its bytes written at 1 GB/s
        return w.flops / RATES.matmul_flops + w.ops * RATES.op_s + w.views * RATES.view_s + w.bytes / 1e9

    probe = ModelProbe(seconds(layer), seconds(outside), RATES.matmul_flops)
    probed = Rates(**{**vars(RATES), "model": probe})
    single = predict_step(cfg, 1, probed, build_optimizer)
    assert single.parts["compute"] == pytest.approx(2 * (cfg.model.n_layer * probe.layer_s + probe.outside_s))
    assert single.step_s != predict_step(cfg, 1, RATES, build_optimizer).step_s  # the probe, not the chain's op cost
    assert "the run's model probed plain" in single.tag(probed)
    tp = predict_step(_cfg("trainer.grad_accum_steps=2", "parallelism=tp"), 2, probed, build_optimizer)
    fixed = 2 * (cfg.model.n_layer * (layer.ops * RATES.op_s + layer.views * RATES.view_s)
                 + outside.ops * RATES.op_s + outside.views * RATES.view_s)
    assert tp.parts["compute"] == pytest.approx(fixed + (single.parts["compute"] - fixed) / 2
                                                + 2 * outside.bytes / 1e9 / 2, rel=1e-6)
    # FSDP's weights gathered in bf16 spare the trace autocast's casts, so it writes fewer bytes; the probe timed the
    # plain model, so an FSDP micro-batch costs what the plain one does (before, the fewer bytes made gpt_nano's
    # fsdp bf16 run predict 26,902 tokens/s against 18,159 measured): what the layout changes is its own probe's
    bf16 = ["trainer.grad_accum_steps=2", "precision=bf16"]
    sharded = _cfg(*bf16, "parallelism=fsdp")
    assert layer_work(sharded, rows // 2, True)[0].bytes < layer_work(sharded, rows // 2, False)[0].bytes
    fsdp = predict_step(sharded, 2, probed, build_optimizer)
    assert fsdp.parts["compute"] == pytest.approx(predict_step(_cfg(*bf16, "parallelism=ddp"), 2, probed,
                                                               build_optimizer).parts["compute"])


def test_a_probed_pipeline_schedule_is_paid_per_schedule_step_and_holds_its_sends_fixed_costs():
    """With the run's own pipeline schedule probed (:func:`costlab.measure.stepprobes.schedule_seconds`), each
    schedule step (one per accumulated group of micro-batches) pays it, and the sends keep only their bytes on the
    link model: their fixed costs were in the schedule's timing."""
    cfg = _cfg("parallelism=pp", "trainer.grad_accum_steps=2")
    unprobed = predict_step(cfg, 2, RATES, build_optimizer)
    scheduled = Rates(**{**vars(RATES), "schedule_s": 4e-3, "schedule_probed": True})
    probed = predict_step(cfg, 2, scheduled, build_optimizer)
    assert "schedule" not in unprobed.parts
    assert probed.parts["schedule"] == pytest.approx(2 * 4e-3)
    sends = 2 * cfg.parallelism.microbatches * 2  # micro-batches a step, each an activation forward, a gradient back
    latency = RATES.link["all_gather"][0]
    assert probed.parts["communication"] == pytest.approx(unprobed.parts["communication"] - sends * latency)
    assert probed.parts["compute"] == unprobed.parts["compute"] and probed.parts["bubble"] == unprobed.parts["bubble"]
    tag = probed.tag(scheduled)
    assert "the pipeline's schedule 4 ms per schedule step" in tag
    assert "layout" not in probed.parts and "the layout's wrapping" not in tag  # a plain pipeline wraps nothing


@pytest.mark.parametrize("option", ["pp", "ddp", "fsdp"])
def test_a_probe_that_came_to_nothing_still_counts_as_probed(option):
    """A probe of the run's own schedule or wrapping whose figure is 0 (what it timed was within the noise of what
    the model already prices: every rank's median at most that) was still run: its part is 0 and named in the tag,
    the source says it was probed, and the fixed costs it held are not priced again on the link model."""
    cfg = _cfg(f"parallelism={option}", "trainer.grad_accum_steps=2")
    key, part = ("schedule", "schedule") if option == "pp" else ("layout", "layout")
    zero = Rates(**{**vars(RATES), f"{key}_probed": True})
    nothing = predict_step(cfg, 2, zero, build_optimizer)
    assert nothing.parts[part] == 0
    assert nothing.parts["communication"] < predict_step(cfg, 2, RATES, build_optimizer).parts["communication"]
    named = nothing.tag(zero)
    assert f"{part} 0 ms" in named.split(";")[0]
    assert ("the pipeline's schedule 0 ms" in named) == (option == "pp")
    assert ("the layout's wrapping 0 ms per layer" in named) == (option != "pp")
    probes = RankProbes(matmul_flops=1e11, op_s=4e-6, view_s=2e-6, bytes_per_s=1e10, link=dict(RATES.link),
                        **{f"{key}_probed": True})
    source = cpu_rates(cfg, probes).source
    assert ("the run's pipeline schedule on one short row" in source) == (option == "pp")
    assert ("the run's model wrapped as it runs" in source) == (option != "pp")


def test_a_gpu_run_predicts_from_its_cards_probes_and_logs_its_plan_beside():
    """A GPU run whose card was probed (:func:`costlab.measure.stepprobes.card_probes`) predicts with what the card
    measured in place of the calibrated shares: its model's seconds per micro-batch, its host's dispatch per op,
    its memory's writes; attention and the links stay the hardware option's. Beside it, the run logs its plan's
    prediction (the option's calibrated rates alone). No card here: the probes' figures are given."""
    from costlab.launcher.plan import predict_time
    from costlab.measure.cardrates import card_rates, gpu_rates
    from costlab.measure.stepprobes import RankProbes
    from costlab.measure.steptime import PLANNED_TOKENS_PER_S, PREDICTED_TOKENS_PER_S, TIME_MODEL_TAG, predicted_metrics

    overrides = ["hardware=h100_sxm", "precision=bf16", "trainer.grad_accum_steps=2"]
    cfg = compose_config([*TINY, *overrides, "trainer.device=cuda"])
    probes = RankProbes(matmul_flops=3e14, op_s=6e-6, view_s=0.0, bytes_per_s=2e12, link=None,
                        model=ModelProbe(layer_s=2e-3, outside_s=1e-3, matmul_flops=3e14))
    rates, plan = card_rates(cfg, "bf16", probes), gpu_rates(cfg, "bf16")
    assert (rates.matmul_flops, rates.bytes_per_s, rates.host_op_s) == (3e14, 2e12, 6e-6)
    assert (rates.attention_flops, rates.link, rates.overlap) == (plan.attention_flops, plan.link, plan.overlap)
    step = predict_step(cfg, 1, rates, build_optimizer)
    assert step.parts["compute"] == pytest.approx(2 * (cfg.model.n_layer * 2e-3 + 1e-3))  # two micro-batches
    figures, tag = predicted_metrics(cfg, 1, probes, build_optimizer, "bf16")
    assert figures[PREDICTED_TOKENS_PER_S] == pytest.approx(step.tokens_per_s)
    assert "probes on this card" in tag[TIME_MODEL_TAG] and "fitted on llm-foundry" in tag[TIME_MODEL_TAG]
    planned, _ = predict_time(compose_config([*TINY, *overrides, "mode=plan"]), 1)
    assert figures[PLANNED_TOKENS_PER_S] == pytest.approx(planned.tokens_per_s, rel=1e-9)
    assert figures[PREDICTED_TOKENS_PER_S] != pytest.approx(planned.tokens_per_s, rel=0.01)
    unprobed, said = predicted_metrics(cfg, 1, None, build_optimizer, "bf16")  # a probe failed: the plan's figure
    assert unprobed[PREDICTED_TOKENS_PER_S] == pytest.approx(planned.tokens_per_s, rel=1e-9)
    assert "the card's probes failed on a rank" in said[TIME_MODEL_TAG]
    assert "probes failed" not in tag[TIME_MODEL_TAG]
    # cards in one node: the link between them measured (the network between nodes stays the option's)
    node = compose_config([*TINY, *overrides, "trainer.device=cuda", "parallelism=fsdp", "trainer.nproc_per_node=2"])
    linked = RankProbes(**{**vars(probes), "link": {k: (5e-6, 3e11) for k in RATES.link}})
    measured, option = card_rates(node, "bf16", linked), gpu_rates(node, "bf16")
    assert measured.link == linked.link and measured.link != option.link and measured.inter == option.inter
    assert "each collective at two sizes between this node's cards" in measured.source
    fsdp = predict_step(node, 2, measured, build_optimizer)
    assert fsdp.parts["overlapped_data_parallel"] != predict_step(node, 2, card_rates(node, "bf16", probes),
                                                                  build_optimizer).parts["overlapped_data_parallel"]


def test_the_cards_probes_time_the_run_on_the_ranks_device_and_fail_as_a_whole(capfd):
    """:func:`costlab.measure.stepprobes.card_probes` runs its probes on the rank's device (here the CPU, which takes
    the same code but for the card's clock): the run's model at two depths on its micro-batch, its matmul shapes,
    the host's dispatch, a large add. A probe that raises costs the prediction its probes and says so; the run
    goes on."""
    from costlab.measure.stepprobes import card_probes
    from costlab.parallelism.core import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    probes = card_probes(_cfg(), env, build_optimizer)
    assert probes is not None and probes.model is not None and probes.link is None
    assert probes.model.layer_s > 0 and probes.model.outside_s > 0 and probes.model.matmul_flops > 0
    assert probes.matmul_flops > 0 and 0 < probes.op_s < 1e-2 and probes.bytes_per_s > 1e8
    # a micro-batch no memory holds: its matmul shapes cannot be allocated, as a card beside its trained model can
    # run out of memory
    huge = _cfg(f"trainer.batch_size={2**40}")
    assert card_probes(huge, env, build_optimizer) is None
    err = capfd.readouterr().err
    assert "the card's time probes failed (RuntimeError" in err and "can't allocate memory" in err


def _card_probes_on_rank(rank: int, world: int, folder: str) -> None:
    """One rank of :func:`_probe_two_ranks`: the card probes of a run's config, then of one that fails on rank 1
    alone; what each returned, saved."""
    import torch.distributed as dist

    from costlab.measure.stepprobes import card_probes
    from costlab.parallelism.core import DistEnv

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world), rank=rank, world_size=world)
    try:
        env = DistEnv(rank, rank, world, world, torch.device("cpu"))
        fine = card_probes(_cfg("parallelism=ddp"), env, build_optimizer)
        huge = f"trainer.batch_size={2**40}"  # on rank 1 alone
        failing = card_probes(_cfg("parallelism=ddp", *([huge] if rank == 1 else [])), env, build_optimizer)
        torch.save({"fine": fine, "failing": failing}, f"{folder}/rank{rank}.pt")
        dist.barrier()  # the ranks leave together (without it rank 1 aborted at exit, after saving, 3 runs in 23)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_ranks_of_one_node_agree_on_their_card_probes_and_on_a_failure_of_any(tmp_path):
    """On several ranks of one node, every rank gets the slowest rank's figures and the link measured between
    them; when a probe fails on one rank, every rank returns None (the plan's rates), and none waits for a peer in
    a collective it will not join. (Two CPU ranks on gloo: the card's code but for its clock.)"""
    spawn_ranks(_card_probes_on_rank, 2, tmp_path, 120, "probing the card")
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert saved[0]["fine"] == saved[1]["fine"]
    link = saved[0]["fine"].link
    assert set(link) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(latency >= 0 and bandwidth > 0 for latency, bandwidth in link.values())
    assert saved[0]["failing"] is None and saved[1]["failing"] is None


def _budgeted_probe_on_rank(rank: int, world: int, folder: str) -> None:
    """One rank of the budget test: the DDP wrapping's depths timed with rank 1's budget far larger than rank 0's;
    how many timings each rank made, saved."""
    import torch.distributed as dist

    from costlab.measure import stepprobes

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world), rank=rank, world_size=world)
    try:
        timings = []
        wall = stepprobes._wall_seconds
        stepprobes._wall_seconds = lambda call, device=None: timings.append(1) or wall(call, device)
        stepprobes.depth_seconds(_cfg("parallelism=ddp"), world, build_optimizer, wrapped=True,
                                 budget_s=1e-9 if rank == 0 else 60.0)
        torch.save(len(timings), f"{folder}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_budgeted_probe_times_a_short_pass_more_often_and_its_ranks_agree_how_often(tmp_path, monkeypatch):
    """With a budget, each part of a pass is timed as often as its warm timing says fits, between the given repeats
    and MAX_REPEATS; ranks that disagree take the larger count (each timing starts at a barrier: a rank that
    stopped early would leave its peer waiting). Without one, the given repeats."""
    from costlab.measure import stepprobes, timemodel

    spawn_ranks(_budgeted_probe_on_rank, 2, tmp_path, 120, "timing with a budget")
    depths = len(timemodel.LAYOUT_DEPTHS)
    # per depth: the warm pass and step timed once for the count, then each timed the count's times
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [depths * 2 * (1 + stepprobes.MAX_REPEATS)] * 2
    timings = []
    wall = stepprobes._wall_seconds
    monkeypatch.setattr(stepprobes, "_wall_seconds", lambda call, device=None: timings.append(1) or wall(call, device))
    stepprobes.depth_seconds(_cfg(), 1, build_optimizer, wrapped=False, repeats=3)
    assert len(timings) == depths * 2 * 3


@pytest.mark.parametrize("layouts", [(False,), (True, False)])
def test_a_stretch_where_the_host_runs_slow_weighs_on_every_depth_and_layout_alike(layouts, monkeypatch):
    """The probe's models are all built first and timed in turn, round after round: a slow stretch of the host's
    (here a second added to every timing from the middle of the probe on) moves each depth's and each layout's
    median alike, so a layer's cost (the depths' difference) and the wrapping's (wrapped less plain) keep their
    size; timed one depth (or layout) after the other, the stretch would fall on the last ones alone."""
    from costlab.measure import stepprobes, timemodel

    cfg = _cfg("model.n_layer=4")
    repeats = 5
    parts = 2 * len(timemodel.LAYOUT_DEPTHS) * len(layouts)  # per round: each variant's passes and its update
    timings = []
    wall = stepprobes._wall_seconds

    def slow_from_the_middle(call, device=None):
        seconds = wall(call, device)
        timings.append(seconds)
        return seconds + (1.0 if len(timings) > parts * (repeats // 2) else 0.0)  # rounds 3-5 of 5

    monkeypatch.setattr(stepprobes, "_wall_seconds", slow_from_the_middle)
    seconds = stepprobes.layouts_seconds(cfg, 1, build_optimizer, layouts, repeats=repeats)
    assert len(timings) == parts * repeats
    for per_depth in seconds:
        assert all(passes > 1.0 and update > 1.0 for passes, update in per_depth.values())  # the stretch is there
        layer, outside, step_layer, step_outside = timemodel.per_layer(per_depth)
        assert layer < 0.1 and step_layer < 0.1 and outside > 0.9 and step_outside > 0.9
    if len(seconds) == 2:
        wrapped, plain = seconds
        assert all(abs(w - p) < 0.1 for d in plain for w, p in zip(wrapped[d], plain[d], strict=True))


def test_in_bursts_each_models_timings_come_one_after_the_other(monkeypatch):
    """``in_turn=False`` (the schedule probe's plain stage, whose level it takes off) times each depth's passes and
    update repeatedly before the next depth's, as training runs one model; by default a round times every depth."""
    from costlab.measure import stepprobes, timemodel

    cfg = _cfg("model.n_layer=4")
    timed = []
    wall = stepprobes._wall_seconds
    monkeypatch.setattr(stepprobes, "_wall_seconds", lambda call, device=None: timed.append(call) or wall(call, device))
    stepprobes.depth_seconds(cfg, 1, build_optimizer, False, repeats=3, in_turn=False)
    passes = timed[::2]  # each timing's forward and backward, then its update
    assert len(timed) == 2 * len(timemodel.LAYOUT_DEPTHS) * 3
    assert len(set(passes[:3])) == 1 and len(set(passes[3:])) == 1 and passes[0] is not passes[3]
    timed.clear()
    stepprobes.depth_seconds(cfg, 1, build_optimizer, False, repeats=3)
    passes = timed[::2]
    assert passes[0] is not passes[1] and passes[0] is passes[2] and passes[1] is passes[3]


def test_the_slowest_ranks_split_of_a_layer_and_the_outside_is_one_ranks():
    """Of several ranks' probes, each figure is the largest, but a pair (per layer, outside the layers) is the rank's
    whose total at the run's depth is the largest: rank 0 reads 2 ms a layer and nothing outside (8 ms at 4
    layers), rank 1 0.5 ms and 3 ms (5 ms); their parts' own largest would make 11 ms, which no rank took."""
    from costlab.measure.stepprobes import slowest_pairs

    ranks = [[1.0, 2e-3, 0.0, 7.0], [4.0, 0.5e-3, 3e-3, 5.0]]
    assert slowest_pairs(ranks, (1,), 4) == [4.0, 2e-3, 0.0, 7.0]
    assert slowest_pairs(ranks, (1,), 1) == [4.0, 0.5e-3, 3e-3, 7.0]  # at one layer rank 1's 3.5 ms is the larger
    assert slowest_pairs(ranks, (), 4) == [4.0, 2e-3, 3e-3, 7.0]
    assert slowest_pairs([[1.0, 2.0]], (0,), 3) == [1.0, 2.0]


def test_a_plans_companions_work_while_it_does_request_after_request_and_none_is_left():
    """The companions a CPU plan starts beside it each say ready once, then work on each request while the plan
    does: the windows in which this process and its two companions worked share a stretch, for each of two
    requests (a search plans many candidates with the same companions); once stopped, none is left running."""
    import sys
    import time

    import psutil

    from costlab.measure.companions import at_once, start_companions, stop_companions

    script = ("import json, sys, time\nprint('ready', flush=True)\nfor line in sys.stdin:\n    t = time.time()\n"
              "    time.sleep(float(line))\n    print(json.dumps([t, time.time()]), flush=True)")

    def mine() -> list[float]:
        start = time.time()
        time.sleep(0.5)
        return [start, time.time()]

    before = {child.pid for child in psutil.Process().children()}  # another test's server may be running
    procs = start_companions([sys.executable, "-c", script], 2)
    try:
        for _ in range(2):
            rows = at_once(procs, "0.5", mine)
            assert len(rows) == 3 and all(end - start >= 0.5 for start, end in rows)
            assert max(start for start, _ in rows) < min(end for _, end in rows)
        assert all(proc.poll() is None for proc in procs)  # still there for the next request
    finally:
        stop_companions(procs)
    assert {child.pid for child in psutil.Process().children()} <= before


def test_a_plans_rates_are_the_slowest_of_it_and_its_companions(monkeypatch):
    """A CPU plan of two ranks times its rates beside a companion process that times the same (the probes of
    :func:`rank_times`, run in a fresh interpreter): with this process's own figures made a million times too fast,
    each figure is the companion's."""
    from costlab.measure import companions, stepprobes

    monkeypatch.setattr(stepprobes, "matmul_seconds", lambda *args: [1e-15])
    monkeypatch.setattr(stepprobes, "fixed_times", lambda *args: [1e-15] * 5)
    (per_flop,), timed = companions.beside_peers(1, 1, "matmul_seconds", 64, 32, 128, 1, "float32")
    assert timed == 1 and 1e-13 < per_flop < 1e-6  # a real matmul's: under a TFLOP/s and over a MFLOP/s
    fixed, timed = companions.beside_peers(1, 1, "fixed_times", True)  # the same companion, asked again
    per_op, per_view, per_byte, per_policed_op, per_step_op = fixed
    assert timed == 1 and all(1e-8 < f < 1e-2 for f in (per_op, per_view, per_policed_op, per_step_op))  # 10 ns-10 ms
    assert 1e-12 < per_byte < 1e-8  # 100 MB/s to 1 TB/s


def test_a_companion_that_cannot_start_leaves_a_plan_its_own_rates(monkeypatch, capsys):
    import sys

    import psutil

    from costlab.measure import companions

    monkeypatch.setattr(companions, "companion_command", lambda: [sys.executable, "-c", "raise SystemExit(3)"])
    companions.companions.cache_clear()
    before = {child.pid for child in psutil.Process().children()}  # another test's server may be running
    try:
        figures, timed = companions.beside_peers(1, 1, "fixed_times", False)
    finally:
        companions.companions.cache_clear()
    assert timed == 0 and all(f > 0 for f in figures[:3]) and figures[3] == 0.0  # no policed op asked for
    assert "without companions (a companion process exited with code 3" in capsys.readouterr().err
    assert {child.pid for child in psutil.Process().children()} <= before


def test_a_cpus_link_latency_is_a_calls_mean_within_a_step_its_compute_between_untimed():
    """On a CPU, the link probe's latency is a small call's mean made as a step makes it, after a stretch of
    compute on every rank (ranks that share cores wait there several times longer than in back-to-back calls):
    every call timed, the stretch between them not."""
    import time

    from costlab.measure.stepprobes import in_step_seconds
    from costlab.parallelism.apply import fake_group

    with fake_group(0, 2):
        seconds = in_step_seconds(lambda: time.sleep(0.002), calls=4, stretch=lambda: time.sleep(0.05))
    assert 0.002 <= seconds < 0.05


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_a_fine_tuning_runs_work_and_weights_are_its_adapters(finetune):
    """LoRA's frozen base computes no weight gradients and its optimizer steps the adapters alone: the traced
    FLOPs are those PyTorch's counter reads off one real step of the model as the run fine-tunes it, and the
    weights the step reduces, gathers and holds in NF4 are the real model's."""
    pytest.importorskip("peft")
    from torch.utils.flop_counter import FlopCounterMode

    from costlab.measure.timemodel import optimizer_work
    from costlab.models.adapters import apply_finetune
    from costlab.models.loss import loss_fn

    shape = ["model.n_layer=3", "model.n_embd=64", "model.n_head=2", "model.block_size=32"]
    extra = ["finetune.backend=torchao"] if finetune == "qlora" else []
    cfg = _cfg(*shape, f"finetune={finetune}", *extra)
    rows = 4
    layer, outside = layer_work(cfg, rows, fsdp=False)
    torch.manual_seed(0)
    model = apply_finetune(build_model(cfg.model), cfg)
    x = torch.randint(0, 256, (rows, 32))
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), x).backward()
    # the counter knows CUDA's attention kernels, not the CPU's: the trace's own count of those is set aside
    matmuls = (layer.flops - layer.attention) * 3 + outside.flops - outside.attention
    assert matmuls == pytest.approx(counter.get_total_flops(), rel=1e-6)
    full, full_outside = layer_work(_cfg(*shape), rows, fsdp=False)
    assert layer.flops * 3 + outside.flops < 0.85 * (full.flops * 3 + full_outside.flops)  # no weight gradients
    _, _, per_layer, rest, _ = optimizer_work(cfg, build_optimizer)
    params = dict(model.named_parameters())
    trained = sum(p.numel() for p in params.values() if p.requires_grad)
    nf4 = sum(p.numel() for n, p in params.items() if n.endswith("base_layer.weight")) if finetune == "qlora" else 0
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad) - nf4
    assert per_layer.times(3).plus(rest) == pytest.approx((trained, frozen, nf4))
    # FSDP reduce-scatters the adapters' gradients alone: less than a full fine-tune's
    tuned = predict_step(_cfg(*shape, f"finetune={finetune}", *extra, "parallelism=fsdp"), 2, RATES, build_optimizer)
    whole = predict_step(_cfg(*shape, "parallelism=fsdp"), 2, RATES, build_optimizer)
    assert tuned.parts["communication"] < whole.parts["communication"]


@pytest.mark.parametrize("overrides", [
    [*TINY],  # costlab's GPT: learned positions, a GELU MLP
    [*TINY, "precision=bf16"],  # the blocks' outputs and the logits reduced and gathered in bf16
    [*TINY, "model.mlp=swiglu", "model.pos=rope", "model.n_embd=48"],  # its Llama variant: no positions to reduce
    [*HF_TINY, "precision=bf16"],  # a Hugging Face Llama
    [*TINY, "precision=bf16", "parallelism=fsdp_tp", "trainer.nproc_per_node=4"],  # FSDP's bf16 residual stream
    [*HF_TINY, "model.config=neox_tiny"],  # GPT-NeoX: one fused query_key_value
    [*HF_TINY, "model.config=qwen3_tiny"],  # Qwen3: its per-head q/k norms' weight gradients
    [*HF_TINY, "model.config=qwen3_tiny", "parallelism=fsdp_tp", "trainer.nproc_per_node=4"],  # FSDP reduces them
    [*HF_TINY, "model.config=gpt2_tiny", "precision=bf16"],  # GPT-2: its packed c_attn's whole bias's gradient
    [*TINY, "model.vocab_size=257", "model.block_size=31"],  # rows split unevenly: the logits gathered padded
], ids=["gpt", "gpt-bf16", "gpt-swiglu", "hf-llama-bf16", "gpt-fsdp-tp-bf16", "hf-neox", "hf-qwen3",
        "hf-qwen3-fsdp-tp", "hf-gpt2-bf16", "gpt-uneven-rows"])
def test_tensor_parallels_collectives_are_those_its_layout_issues(overrides):
    """The time model's tensor-parallel collectives, per kind (calls and bytes), are those costlab's layout issues
    in one micro-batch's forward and backward: counted as rank 0 of two runs it under PyTorch's fake process group
    (each collective local). DTensor all-reduces each column-wise projection's input gradient apart: 6 all-reduces
    a GPT block, 7 a SwiGLU or Llama one, where the time model had Megatron's 4; and it all-gathers the logits.
    Qwen3's q/k norms' weight gradients are all-reduced too (by the layout's hook, or by FSDP's reduction)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from costlab.measure.timemodel import collective_kind, tp_collectives
    from costlab.measure.traced import hf_shapes
    from costlab.models.hf_config import is_hf
    from costlab.models.loss import loss_fn
    from costlab.parallelism.apply import apply_parallelisms, build_mesh, fake_group
    from costlab.parallelism.dims import parallel_dims

    cfg = compose_config(["parallelism=tp", *overrides, "trainer.device=cpu"])
    world = int(cfg.trainer.nproc_per_node)
    rows, calls, data = 3, Counter(), Counter()

    class Issued(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kind = collective_kind(str(func))
            # tensor parallel's (not FSDP's); an all-gather's input is this rank's shard of what it gathers
            if kind and any(a == tp_group for a in args if isinstance(a, str)):
                calls[kind] += 1
                data[kind] += args[0].nbytes * (dims.tp if kind == "all_gather" else 1)
            return func(*args, **(kwargs or {}))

    with fake_group(0, world):
        dims = parallel_dims(cfg.parallelism, world)
        mesh = build_mesh(dims, "cpu")
        tp_group = mesh["tp"].get_group().group_name
        model = build_model(cfg.model)
        apply_parallelisms(model, cfg, dims, mesh, torch.device("cpu"))
        x = torch.zeros(rows, int(cfg.model.block_size), dtype=torch.long)
        low = cfg.precision.get("autocast_dtype")
        with Issued():
            with torch.autocast("cpu", dtype=getattr(torch, low or "bfloat16"), enabled=bool(low)):
                logits = model(x)
            loss_fn(logits, x).backward()
    shapes = hf_shapes(cfg) if is_hf(cfg) else cfg.model
    predicted_calls, predicted_data = Counter(), Counter()
    for kind, n, size in tp_collectives(cfg, shapes, rows, int(shapes.n_layer), dims.fsdp_enabled, dims.tp):
        predicted_calls[kind] += n
        predicted_data[kind] += n * size
    assert dims.tp == 2 and calls["all_reduce"] >= 4 * int(shapes.n_layer) and calls["all_gather"] >= 1
    assert predicted_calls == calls and predicted_data == data
