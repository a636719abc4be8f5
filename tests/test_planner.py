"""``mode=plan plan.search=true``: every layout of the devices predicted and ranked; the best row runs as it is."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from costlab.launcher.planner import layouts, rank
from tests.conftest import TINY, compose_config, refusal


def test_every_factorization_of_the_devices_is_a_layout():
    found = layouts(16, 8)
    assert all(pp * rep * shard * tp == 16 for pp, rep, shard, tp in found)
    assert len(set(found)) == len(found)
    assert {tp for *_, tp in found} == {1, 2, 4, 8}  # tensor parallel stays inside a node of 8
    # every ordered factorization of 16 = 2^4 into four factors with tp <= 8: C(7, 3) = 35, less tp = 16's one
    assert len(found) == 35 - 1


def test_every_layout_tries_one_sequence_a_micro_batch_and_the_whole_share():
    """The micro-batches a layout is tried at: the smallest (what a large model fits in) and a rank's whole share of
    the batch (what a small one runs fastest at) always, whatever the share; each cut makes up the share."""
    from costlab.launcher.planner import MAX_MICRO_CHOICES, _micro_choices

    for per_rank in (1, 3, 12, 64, 128, 512, 1000):
        cuts = _micro_choices(per_rank, 1)
        rows = [r for r, _, _ in cuts]
        assert rows[0] == 1 and rows[-1] == per_rank and len(rows) == len(set(rows)) <= MAX_MICRO_CHOICES, rows
        assert all(r * accum == per_rank and chunks == 1 for r, accum, chunks in cuts)
    assert [r for r, _, _ in _micro_choices(128, 1)] == [1, 2, 4, 8, 16, 32, 64, 128]
    piped = _micro_choices(64, 4)  # a pipeline of 4: at least 4 micro-batches, no accumulation
    assert piped and all(r * chunks == 64 and chunks >= 4 and accum == 1 for r, accum, chunks in piped)
    assert piped[0][0] == 1


def test_each_row_of_the_table_cuts_the_global_batch_whole():
    """A row says how its ranks cut the batch: sequences per micro-batch x accumulation steps x a pipeline's
    micro-batches x the data-parallel degree is ``trainer.batch_size``, for every row shown."""
    from costlab.launcher.planner import search, table

    base = ["mode=plan", "model=gpt2_small", "hardware=h100_sxm", "trainer.nproc_per_node=2", "trainer.batch_size=8"]
    found, ranked, seconds = search(compose_config(base), lambda extra: compose_config(base + extra))
    lines = table(ranked, len(found), seconds, shown=len(ranked))
    header, rows = lines[1].split(), [line.split() for line in lines[2:]]
    assert header[:11] == ["#", "pp", "x", "rep", "x", "shard", "x", "tp", "ckpt", "micro", "accum"], header
    assert len(rows) == len(ranked) and any(r[1] != "1" for r in rows)  # pipelines among them
    for r in rows:
        pp, rep, shard = int(r[1]), int(r[3]), int(r[5])
        micro, accum, chunks = int(r[9]), int(r[10]), int(r[11]) if pp > 1 else 1
        assert micro * accum * chunks * rep * shard == 8, r


def test_a_row_runs_with_the_users_overrides_less_what_the_search_chose():
    from costlab.launcher.planner import _runnable

    user = ["model=hf", "parallelism=fsdp", "parallelism.reshard_after_forward=false", "precision=bf16", "mode=plan",
            "plan.search=true", "plan.tokens=1e12", "trainer.activation_checkpointing=full", "trainer.max_steps=3"]
    sets = ["parallelism=ddp", "parallelism.dp_replicate=2", "precision=fp32", "trainer.activation_checkpointing=none"]
    assert _runnable(user, sets) == ["model=hf", "trainer.max_steps=3", *sets]


def test_a_search_outside_a_plan_is_refused_rather_than_trained():
    error = refusal(*TINY, "plan.search=true")
    assert error.key == "plan.search" and "mode=plan" in str(error)


def test_a_search_tries_only_the_precisions_and_checkpointing_modes_it_is_narrowed_to():
    from costlab.launcher.planner import candidates

    base = ["mode=plan", "plan.search=true", "model=llama_7b", "hardware=h100_sxm", "trainer.nproc_per_node=8",
            "trainer.batch_size=3"]
    every = candidates(compose_config(base), lambda extra: compose_config(base + extra))
    narrowed = [*base, "plan.precisions=[fp8]", "plan.checkpointing=[none,selective]"]
    found = candidates(compose_config(narrowed), lambda extra: compose_config(narrowed + extra))
    assert {c.cfg.precision.name for c in every} == {"bf16", "fp8"} and {c.mode for c in every} == {
        "none", "selective", "full"}
    kept = [c for c in every if c.cfg.precision.name == "fp8" and c.mode != "full"]
    assert found and [c.overrides for c in found] == [c.overrides for c in kept]  # the same candidates, no others


@pytest.mark.parametrize("overrides, why", [
    (["plan.precisions=[bf16]"], "narrows a layout search only: add mode=plan plan.search=true"),
    (["mode=plan", "plan.search=true", "plan.checkpointing=[]"], "must name at least one"),
    (["mode=plan", "plan.search=true", "plan.precisions=[fp32]"], "hardware=h100_sxm is searched in bf16, fp8 only"),
    (["mode=plan", "plan.search=true", "plan.precisions=[fp9]"], "choose one of bf16, fp16, fp32, fp8"),
    (["mode=plan", "plan.search=true", "plan.checkpointing=[some]"], "choose one of none, selective, full"),
])
def test_a_search_narrowed_to_nothing_it_can_try_is_refused(overrides, why):
    error = refusal(*TINY, *(["hardware=h100_sxm"] if "mode=plan" in overrides else []), *overrides)
    assert error.key in ("plan.precisions", "plan.checkpointing") and why in str(error), str(error)


def test_the_ranking_marks_what_another_candidate_beats():
    from costlab.launcher.planner import Candidate

    def made(tps: float, memory: float) -> Candidate:
        return Candidate([], compose_config(TINY), fits=True,
                         metrics={"plan/tokens_per_s": tps, "plan/memory_bytes_per_device": memory})

    fast_small, slow_big, fast_big = made(100, 1e9), made(50, 2e9), made(100, 3e9)
    ranked = rank([slow_big, fast_big, fast_small, Candidate([], fast_small.cfg, fits=False)])
    assert ranked[0] is fast_small and len(ranked) == 3  # the unfitting one dropped
    assert not fast_small.dominated and slow_big.dominated and fast_big.dominated


def test_a_7b_search_on_8_cards_tries_every_tensor_parallel_degree_and_fp8_and_says_what_it_left_out():
    from costlab.launcher.planner import candidates

    # Llama-2-7B's MLP of 11008 units splits over 4 and 8 ranks, in float8's multiples of 16 (10922 did not)
    base = ["mode=plan", "model=llama_7b", "hardware=h100_sxm", "trainer.nproc_per_node=8", "trainer.batch_size=3"]
    refused: dict[str, str] = {}
    found = candidates(compose_config(base), lambda extra: compose_config(base + extra), refused)
    kept = {(c.cfg.parallelism.pp_degree, c.cfg.parallelism.tp_degree, c.cfg.precision.name) for c in found}
    assert kept == {(1, 8, "bf16"), (1, 8, "fp8"), (2, 4, "bf16"), (2, 4, "fp8")}  # 3 sequences: no data parallel
    assert refused["1 x 1 x 8 x 1 fp8"] == "trainer.batch_size=3: not a multiple of the data-parallel degree 8"
    assert "fewer than the pipeline's 4 stages" in refused["4 x 1 x 1 x 2 bf16"]
    tried = {(p.pp_degree, p.dp_replicate, p.dp_shard, p.tp_degree, c.cfg.precision.name)
             for c in found for p in [c.cfg.parallelism]}
    assert len(refused) + len(tried) == 2 * len(layouts(8, 8))  # each layout and precision kept or left out, once


def test_a_search_splits_gpt_neox_and_gpt2_by_tensor_parallel_and_says_why_olmo2_is_not(tmp_path):
    import json

    from costlab.launcher.planner import candidates

    base = ["mode=plan", "model=hf", "hardware=h100_sxm", "trainer.nproc_per_node=4", "trainer.batch_size=8",
            "model.block_size=64"]
    olmo2 = tmp_path / "olmo2.json"  # its q/k norms take their statistics over every head's outputs
    olmo2.write_text(json.dumps({"model_type": "olmo2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}))
    degrees = {}
    for config in ("neox_tiny", "gpt2_tiny", str(olmo2)):
        overrides = [*base, f"model.config={config}"]
        refused: dict[str, str] = {}
        found = candidates(compose_config(overrides), lambda extra, o=overrides: compose_config(o + extra), refused)
        degrees[Path(config).stem] = {c.cfg.parallelism.tp_degree for c in found}
        if config == str(olmo2):
            assert "model_type is olmo2" in refused["1 x 1 x 1 x 4 bf16"], refused
    assert degrees == {"neox_tiny": {1, 2, 4}, "gpt2_tiny": {1, 2, 4}, "olmo2": {1}}


def test_a_search_without_a_candidate_says_why_each_layout_was_left_out():
    from costlab.launcher.planner import candidates, not_one

    # one sequence a step on two ranks: no data parallel, no pipeline; one head: no tensor parallel
    base = [*TINY, "mode=plan", "hardware=cpu", "trainer.nproc_per_node=2", "trainer.batch_size=1", "model.n_head=1"]
    refused: dict[str, str] = {}
    assert candidates(compose_config(base), lambda extra: compose_config(base + extra), refused) == []
    lines = not_one(refused)
    assert len(refused) == 2 * len(layouts(2, 2)) and str(len(refused)) in lines[0]
    text = "\n".join(lines)
    for why in ("not a multiple of the data-parallel degree 2", "fewer than the pipeline's 2 stages",
                "parallelism.tp_degree=2: must divide model.n_head=1"):
        assert why in text, text


@pytest.mark.parametrize("overrides, over", [
    (["model=llama_7b", "trainer.nproc_per_node=2"], "optimizer state alone"),  # 7B x 16 bytes over 2 L4s
    (["model=gpt2_small", "model.block_size=65536", "trainer.nproc_per_node=1"], "grows with a micro-batch's tokens"),
])
def test_a_search_where_nothing_fits_says_how_far_the_closest_is_and_what_is_over(overrides, over):
    from costlab.launcher.planner import nothing_fits, search

    base = ["mode=plan", "hardware=l4", "trainer.batch_size=2", *overrides]
    cfg = compose_config(base)
    found, ranked, _ = search(cfg, lambda extra: compose_config(base + extra))
    assert found and not ranked
    assert not any("plan/tokens_per_s" in c.metrics for c in found)  # a search times only what fits
    least = min(c.metrics["plan/memory_bytes_per_device"] for c in found)
    lines = nothing_fits(found)
    assert f"needs is {least / 1e9:.3g} GB of {cfg.hardware.memory_gb:.3g} GB" in lines[0] and over in lines[1], lines
    assert ("optimizer=adamw_8bit or finetune=lora" in lines[1]) == (over == "optimizer state alone")


@pytest.mark.slow
@pytest.mark.e2e
def test_a_search_on_this_cpu_ranks_layouts_and_its_best_row_trains(cli):
    """On this machine's two ranks: the candidates are logged as children of the plan's run, each with its
    command; the cheapest one, run as printed for a few steps, fits and trains, and keeps its link probe for the
    plans that follow (a plan has no peers to probe one with)."""
    user = [*TINY, "hardware=cpu", "trainer.nproc_per_node=2", "trainer.max_steps=3",
            f"hardware.probe_cache={cli.out}/probes.json"]
    # every layout of 2 ranks and micro-batch, in fp32 without checkpointing (each candidate is probed here)
    proc = cli(*user, "mode=plan", "plan.search=true", "plan.precisions=[fp32]", "plan.checkpointing=[none]",
               "tracking.run_name=search")
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = cli.run_by_name("search")
    m = parent.data.metrics
    assert parent.info.status == "FINISHED" and m["plan/fitting"] >= 6 and m["plan/candidates"] >= m["plan/fitting"]
    children = cli.runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == m["plan/fitting"]
    assert {c.data.params["parallelism"] for c in children} == {"ddp", "fsdp", "tp", "pp"}  # every layout of 2
    best = next(c for c in children if c.data.tags["costlab.plan_rank"] == "1")
    assert best.data.metrics["plan/tokens_per_s"] == max(c.data.metrics["plan/tokens_per_s"] for c in children)
    command = best.data.tags["costlab.run_command"]
    assert command == parent.data.tags["costlab.run_command"] and command in proc.stderr
    from costlab import report  # the sweep report compares the candidates: what each predicts on its card

    rep = report.build_report(report.load_runs(cli.client(), parent=parent.info.run_id))
    assert rep.summary.startswith("Predicted on cpu") and f"{len(children)} of {len(children)} fit" in rep.summary
    assert all(r.levers["model"] == "gpt_nano" and r.levers["world_size"] == "2" for r in rep.rows)
    args = shlex.split(command)[2:]  # python run.py <overrides>
    assert not any(a.startswith(("mode=", "plan.")) for a in args)
    run = cli(*args, "tracking.run_name=best")
    assert run.returncode == 0, run.stderr[-3000:]
    trained = cli.run_by_name("best")
    assert trained.info.status == "FINISHED" and trained.data.metrics["train/loss"] > 0
    assert trained.data.params["parallelism.name"] == best.data.params["parallelism"]
    unpriced = "collectives not priced: no run of 2 ranks on this machine has probed its link yet"
    assert unpriced in best.data.tags["costlab.time_model"]
    again = cli(*args, "mode=plan", "tracking.run_name=after")
    assert again.returncode == 0, again.stderr[-3000:]
    tag = cli.run_by_name("after").data.tags["costlab.time_model"]
    assert "the link the median of the probes of 1 earlier runs of 2 ranks here" in tag and unpriced not in tag
