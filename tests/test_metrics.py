import time

import pytest
import torch

from costlab.events import MetricLogger
from costlab.measure.metrics import (
    StepStats,
    count_params,
    hold_peaks,
    peak_memory_bytes,
    save_model,
    state_bytes_per_rank,
    time_inference,
)
from costlab.models.gpt import GPT
from costlab.tracking.runs import flatten
from costlab.training.trainer import lr_at
from tests.conftest import compose_config


def test_step_stats_leave_out_warmup_and_count_all_ranks_tokens():
    stats = StepStats(warmup_steps=2, tokens_per_step=1000)
    for seconds in (9.0, 9.0, 0.1, 0.2, 0.3):
        stats.add(seconds)
    s = stats.summary()
    assert s["perf/timed_steps"] == 3
    assert s["perf/step_time_ms_p50"] == pytest.approx(200.0)
    assert s["perf/tokens_per_s"] == pytest.approx(3000 / 0.6)


def test_step_stats_say_nothing_when_no_step_left_warmup():
    stats = StepStats(warmup_steps=5, tokens_per_step=10)
    stats.add(1.0)
    assert stats.summary() == {}


def test_peak_rss_grows_when_memory_is_touched():
    before = peak_memory_bytes(torch.device("cpu"))
    block = torch.ones(64 * 1024 * 1024 // 4 + before // 4)  # more than the peak so far
    after = peak_memory_bytes(torch.device("cpu"))
    assert after >= before + 60 * 1024 * 1024
    del block


def test_state_bytes_count_params_grads_and_adam_moments():
    model = GPT(n_layer=1, n_head=2, n_embd=32, block_size=8)
    opt = torch.optim.AdamW(model.parameters())
    n = sum(p.numel() for p in model.parameters())
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    opt.step()
    b = state_bytes_per_rank(model, opt)
    assert b["mem/params_bytes_per_rank"] == 4 * n
    assert b["mem/grads_bytes_per_rank"] == 4 * n
    # exp_avg + exp_avg_sq per parameter, plus a scalar step per tensor
    assert 8 * n <= b["mem/optimizer_bytes_per_rank"] <= 8 * n + 8 * len(list(model.parameters()))


def test_saved_size_and_param_count(tmp_path):
    model = GPT(n_layer=1, n_head=2, n_embd=32, block_size=8)
    with torch.no_grad():
        model.blocks["0"].mlp.c_fc.weight.zero_()
    params, nonzero = count_params(model)
    assert nonzero == params - model.blocks["0"].mlp.c_fc.weight.numel()
    size = save_model(model, tmp_path / "m.pt")
    assert 4 * params <= size <= 4 * params + 64 * 1024  # dense fp32 weights plus pickle framing


def test_inference_timer_interleaves_the_models_and_leaves_out_warmup():
    calls: list[str] = []
    models = {}
    for name in ("final", "uncompressed"):
        models[name] = GPT(n_layer=1, n_head=2, n_embd=32, block_size=16)
        models[name].register_forward_hook(lambda *_, name=name: calls.append(name))
    batch = torch.randint(0, 256, (4, 16))
    seconds = time_inference(models, batch, warmup=2, iters=3)
    assert set(seconds) == {"final", "uncompressed"} and all(s > 0 for s in seconds.values())
    assert calls.count("final") == calls.count("uncompressed") == 5  # warm-up passes run but are not timed
    pairs = [tuple(calls[i:i + 2]) for i in range(0, len(calls), 2)]
    assert pairs[0] != pairs[1] and pairs[1] != pairs[2]  # the order alternates: load falls on both alike


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = compose_config(["trainer.max_steps=100", "trainer.warmup_steps=10", "trainer.lr=1e-3"])
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) < 1e-3
    assert lr_at(100, cfg) == pytest.approx(1e-3 * cfg.trainer.min_lr_ratio)


def test_flatten_makes_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_metrics_reach_a_real_store_through_the_run_folder_each_step_once(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from costlab.tracking.relay import Relay
    from costlab.tracking.store import experiment_id

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(experiment_id(mlflow_uri, "costlab")).info.run_id
    relay = Relay(mlflow_uri, run_id, tmp_path, poll_s=0.1)
    logger = MetricLogger(tmp_path, flush_every_s=0.2)
    t0 = time.perf_counter()
    for step in range(200):
        logger.log({"train/loss": 1.0 / (step + 1)}, step)
    hot_path = time.perf_counter() - t0
    logger.set_tags({"costlab.x": "1"})
    logger.close()
    assert logger.time_spent_s <= hot_path
    # a restarted attempt (torchrun --max-restarts) re-runs steps 150..249 from its checkpoint
    again = MetricLogger(tmp_path, flush_every_s=0.2)
    for step in range(150, 250):
        again.log({"train/loss": -1.0}, step)
    again.close()
    assert relay.close() is None
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(250))  # each step once
    assert {m.step: m.value for m in history}[199] == pytest.approx(1 / 200)  # the first attempt's value kept
    assert {m.step: m.value for m in history}[200] == -1.0
    assert client.get_run(run_id).data.tags["costlab.x"] == "1"
    # a resumed run (trainer.resume): a new launcher relays only what is new, each step once
    resumed = Relay(mlflow_uri, run_id, tmp_path, resumed=True, poll_s=0.1)
    third = MetricLogger(tmp_path)
    third.log({"train/loss": -2.0}, 249)
    third.log({"train/loss": -2.0}, 250)
    third.close()
    assert resumed.close() is None
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(251))
    client.set_terminated(run_id)


def test_a_relay_that_cannot_write_reports_it(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from costlab.tracking.relay import Relay
    from costlab.tracking.store import experiment_id

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(experiment_id(mlflow_uri, "costlab")).info.run_id
    client.set_terminated(run_id)
    client.delete_run(run_id)  # a deleted run takes no metrics
    relay = Relay(mlflow_uri, run_id, tmp_path, poll_s=0.1)
    logger = MetricLogger(tmp_path)
    logger.log({"train/loss": 1.0}, 0)
    logger.close()
    assert relay.close() is not None


def test_a_cpu_runs_peak_memory_is_its_resident_sets_before_the_probes():
    """On CPU the resident set's peak cannot be restarted: ``mem/peak_bytes`` is the one held before the time
    model's probes, which build models of their own after training, whatever the process reaches after it."""
    cpu = torch.device("cpu")
    held = hold_peaks(cpu)
    probe = torch.ones(16 * 2**20)  # 64 MB a probe touches after the hold
    assert peak_memory_bytes(cpu, held) == held.rss > 0
    assert peak_memory_bytes(cpu) >= held.rss
    del probe
