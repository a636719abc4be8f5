"""The comparison report, from real MLflow runs in a real SQLite store (no training: the runs are logged
here with the metrics a job logs), and ``python -m costlab.report`` on them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from mlflow.entities import Metric, Param, RunTag
from omegaconf import OmegaConf

from costlab import ROOT, report
from costlab.measure.names import COMPRESSES_IN_TRAINING
from costlab.tracking.store import client, experiment_id
from costlab.tracking.sweep import SWEEP_DIR_TAG

LEVERS = {"model": "gpt_nano", "data": "synthetic", "parallelism": "single", "precision": "fp32",
          "pruning": "none", "quantization": "none", "world_size": "1", "device": "cpu"}
BASE = {"eval/loss": 2.0, "eval/perplexity": 7.389, "perf/tokens_per_s": 10_000.0,
        "mem/params_bytes_per_rank": 4e6, "mem/grads_bytes_per_rank": 4e6, "mem/optimizer_bytes_per_rank": 8e6,
        "mem/peak_bytes": 5e8, "model/size_bytes": 4.2e6, "infer/latency_ms_p50": 10.0, "time/total_s": 20.0}



def _run(c, exp, name, parent=None, status="FINISHED", levers=None, metrics=None, params=None, curve=(3.0, 2.5, 2.2),
         tags=None):
    tags = {**LEVERS, **(levers or {}), **(tags or {})}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = c.create_run(exp, run_name=name, tags=tags)
    rid = run.info.run_id
    values = {**BASE, **(metrics or {})} if metrics is not None or status == "FINISHED" else {}
    batch = [Metric(k, v, 0, 4) for k, v in values.items() if v is not None]
    batch += [Metric("train/loss", v, 0, i) for i, v in enumerate(curve)]
    all_params = {"trainer.lr": "0.003", "trainer.nproc_per_node": tags["world_size"], **(params or {})}
    c.log_batch(rid, metrics=batch, params=[Param(k, v) for k, v in all_params.items()],
                tags=[RunTag("x", "y")])
    c.set_terminated(rid, status)
    return rid


@pytest.fixture
def sweep(mlflow_uri, request, tmp_path):
    """A parent and four children: the baseline, bf16, ddp, and l1-pruned (which saves nothing)."""
    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, f"report_{request.node.name}")
    parent = c.create_run(exp, run_name="sweep", tags={"costlab.role": "sweep", SWEEP_DIR_TAG: str(tmp_path)})
    pid = parent.info.run_id
    ids = {
        "bf16": _run(c, exp, "gpt_nano single bf16 x1", pid, levers={"precision": "bf16"},
                     metrics={"perf/tokens_per_s": 12_800.0, "eval/loss": 2.002}),
        "base": _run(c, exp, "gpt_nano single fp32 x1", pid),
        "ddp": _run(c, exp, "gpt_nano ddp fp32 x2", pid, levers={"parallelism": "ddp", "world_size": "2"},
                    metrics={"perf/tokens_per_s": 9_000.0, "mem/peak_bytes": 6e8}),
        "l1": _run(c, exp, "gpt_nano single fp32 x1 l1_unstructured", pid, levers={"pruning": "l1_unstructured"},
                   metrics={"eval/loss": 2.01, "infer/latency_ms_p50": 9.0, "perf/tokens_per_s": 10_050.0,
                            "infer/speedup": 0.99}),
    }
    return c, exp, pid, ids


def _rows(c, pid):
    return report.load_runs(c, parent=pid)


def test_the_default_baseline_is_single_fp32_uncompressed_and_ratios_are_ratios_of_metrics(sweep):
    c, _, pid, ids = sweep
    rep = report.build_report(_rows(c, pid))
    assert rep.baseline.run_id == ids["base"]
    by_id = {r.run_id: row for r, row in zip(rep.rows, rep.table, strict=True)}
    assert len(by_id) == 4 and by_id[ids["base"]]["baseline"] is True
    bf16, ddp, l1 = by_id[ids["bf16"]], by_id[ids["ddp"]], by_id[ids["l1"]]
    assert bf16["perf/tokens_per_s ratio"] == pytest.approx(1.28)
    assert bf16["eval/loss delta"] == pytest.approx(0.001)
    assert ddp["mem/peak_bytes ratio"] == pytest.approx(1.2)
    assert ddp["state_bytes_per_rank"] == 16e6 and ddp["state_bytes_per_rank ratio"] == pytest.approx(1.0)
    assert l1["infer/latency_ms_p50 speed-up"] == pytest.approx(10.0 / 9.0)
    assert l1["model/size_bytes ratio"] == 1.0
    # every other summary metric both runs have, with its ratio; per-step families are not summaries
    assert {"eval/perplexity", "time/total_s"} <= set(rep.others)
    assert not any(k.startswith("train/") for k in rep.others)
    assert by_id[ids["base"]]["time/total_s ratio"] == 1.0
    assert {bf16["label"], ddp["label"], l1["label"]} == {"bf16", "ddp x2", "l1_unstructured"}
    assert rep.baseline.label == "single fp32 x1"


def test_the_summary_is_built_from_the_numbers_and_says_when_a_lever_saved_nothing(sweep):
    c, _, pid, _ = sweep
    text = report.build_report(_rows(c, pid)).summary
    assert "bf16 trains 1.28x faster at +0.10 % loss" in text
    assert "ddp x2 trains 1.11x slower" in text
    # it trained as the baseline did: its training timings are noise and the summary says nothing of them
    assert "l1_unstructured ships no smaller (1.00x), infers no faster than uncompressed (0.99x) at +0.50 % loss:" \
        " it saved nothing on this hardware (cpu)" in text
    assert text.count("saved nothing") == 2  # ddp too: slower, same state, larger peak


def test_the_summary_speaks_of_fine_tuning_and_optimizer_levers_in_the_same_words(mlflow_uri, request):
    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, f"report_{request.node.name}")
    pid = c.create_run(exp, run_name="sweep", tags={"costlab.role": "sweep"}).info.run_id
    trained = {"model/trainable_params": 1e6}
    _run(c, exp, "gpt_nano single fp32 x1", pid, levers={"finetune": "full", "optimizer": "adamw"}, metrics=trained)
    _run(c, exp, "gpt_nano single fp32 x1 lora", pid, levers={"finetune": "lora", "optimizer": "adamw"},
         metrics={"model/trainable_params": 9e3, "mem/grads_bytes_per_rank": 36e3, "mem/optimizer_bytes_per_rank": 72e3,
                  "eval/loss": 2.008, "infer/latency_ms_p50": 12.0})
    _run(c, exp, "gpt_nano single fp32 x1 adamw_8bit", pid, levers={"finetune": "full", "optimizer": "adamw_8bit"},
         metrics={**trained, "mem/optimizer_bytes_per_rank": 2.1e6, "eval/loss": 1.99})
    text = report.build_report(_rows(c, pid)).summary
    assert "lora trains 0.9 % of the parameters the baseline trains" in text
    assert "holds 0.26x the training state per rank at +0.40 % loss" in text
    assert "adamw_8bit trains no faster (1.00x), holds 0.63x the training state per rank at -0.50 % loss" in text
    assert "trains 100 % of the parameters" not in text  # an optimizer does not change what trains
    # both ship an uncompressed model of the baseline's shape: two jobs' inference latencies differ by noise
    assert "infers" not in text


def test_the_report_ranks_the_levers_by_output_tokens_served_at_the_latency_target(mlflow_uri, request):
    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, f"report_{request.node.name}")
    pid = c.create_run(exp, run_name="sweep", tags={"costlab.role": "sweep"}).info.run_id
    target = {"serve.tpot_ms_p99": "50", "serve.ttft_ms_p99": "1000", "serve.kv_cache_dtype": "auto"}

    def served(tps: float, **more: float) -> dict[str, float]:
        return {"serve/target_output_tokens_per_s": tps, "serve/usd_per_1m_output_tokens": 0.66 * 1000 / tps,
                "serve/max_concurrency": 64, **more}

    _run(c, exp, "base", pid, metrics=served(1000.0), params=target)
    _run(c, exp, "int8", pid, levers={"quantization": "int8_dynamic"}, params=target,
         metrics={**served(1600.0, **{"serve/target_speedup": 1.6}), "model/size_bytes": 1.1e6,
                  "eval/loss": 2.01})
    _run(c, exp, "pruned", pid, levers={"pruning": "structured"}, params=target,
         metrics={"serve/max_concurrency": 64, "model/size_bytes": 3e6})  # no rung met the target
    _run(c, exp, "kv", pid, params={**target, "serve.kv_cache_dtype": "int8"},
         metrics=served(1200.0, **{"serve/kv_eval_loss_delta": 0.002}))
    rep = report.build_report(_rows(c, pid))
    by_label = {row["label"]: row for row in rep.table}
    assert by_label["int8_dynamic"]["serve/target_output_tokens_per_s ratio"] == pytest.approx(1.6)
    assert by_label["int8_dynamic"]["serve/usd_per_1m_output_tokens ratio"] == pytest.approx(1 / 1.6)
    text = rep.summary
    assert "serves 1.60x the output tokens/s than uncompressed at p99 TPOT <= 50 ms, p99 TTFT <= 1000 ms, " \
           "$0.412 vs $0.66 per 1M output tokens at +0.50 % loss" in text
    assert "misses p99 TPOT <= 50 ms, p99 TTFT <= 1000 ms at every concurrency" in text
    # the same model, its KV cache in int8: what it serves, and what the cache's dtype cost in loss
    assert "kv_cache_dtype=int8 serves 1.20x the output tokens/s at p99 TPOT <= 50 ms, p99 TTFT <= 1000 ms, " \
           "$0.55 vs $0.66 per 1M output tokens (its int8 KV cache: +0.20 % loss)" in text
    assert text.endswith("Served at p99 TPOT <= 50 ms, p99 TTFT <= 1000 ms, fastest first (output tokens/s): "
                         "int8_dynamic 1,600 ($0.412/1M), kv_cache_dtype=int8 1,200 ($0.55/1M), "
                         "kv_cache_dtype=auto 1,000 ($0.66/1M).")


def test_the_baseline_can_be_named_by_overrides_or_run_name(sweep):
    c, _, pid, ids = sweep
    rows = _rows(c, pid)
    assert report.build_report(rows, "precision=bf16").baseline.run_id == ids["bf16"]
    assert report.build_report(rows, "parallelism=ddp world_size=2").baseline.run_id == ids["ddp"]
    assert report.build_report(rows, "gpt_nano single fp32 x1 l1_unstructured").baseline.run_id == ids["l1"]
    by_overrides = report.build_report(rows, "trainer.lr=3e-3,pruning=none,precision=fp32,world_size=1")
    assert by_overrides.baseline.run_id == ids["base"]
    with pytest.raises(ValueError, match="report.baseline=precision=fp16: no run matches"):
        report.build_report(rows, "precision=fp16")
    with pytest.raises(ValueError, match="give a run name or overrides"):
        report.build_report(rows, "no such run")


def test_without_a_default_baseline_the_first_run_is_the_baseline(mlflow_uri):
    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, "report_no_default")
    first = _run(c, exp, "a", levers={"precision": "bf16"})
    _run(c, exp, "b", levers={"precision": "fp16"})
    rep = report.build_report(report.load_runs(c, experiment="report_no_default"))
    assert rep.baseline.run_id == first


@pytest.mark.parametrize("maximize", [False, True])
def test_pareto_front(maximize):
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0 + 1e-9)]
    front = report.pareto_front(points, maximize_x=maximize)
    if maximize:  # more x and less y: (4, 1) beats everything
        assert front == [3]
    else:
        assert front == [0, 1, 3]


def test_the_report_is_logged_on_the_parent_and_written_to_disk(sweep, tmp_path):
    c, _, pid, ids = sweep
    out = tmp_path / "out"
    rep = report.build_report(_rows(c, pid))
    md = report.write_report(rep, out, c, pid)
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "report.csv", "pareto_throughput.png", "pareto_size.png", "pareto_latency.png",
            "loss_curves.png", "memory.png"} <= files
    text = md.read_text()
    assert text.startswith("# Comparison report\n\nAgainst the baseline")
    assert "![pareto_size](pareto_size.png)" in text
    assert "Every run: model gpt_nano, finetune full, optimizer adamw, quantization none, device cpu." in text
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} == set(ids.values())
    artifacts = {a.path for a in c.list_artifacts(pid, "report")}
    assert {"report/comparison.json", "report/report.md", "report/report.csv", "report/pareto_throughput.png",
            "report/loss_curves.png", "report/memory.png"} <= artifacts
    table = json.loads(open(c.download_artifacts(pid, "report/comparison.json", str(tmp_path))).read())
    columns = table["columns"]
    got = {row[columns.index("run_id")]: row[columns.index("perf/tokens_per_s ratio")] for row in table["data"]}
    assert got[ids["bf16"]] == pytest.approx(1.28)
    # rebuilt: the table is replaced, not appended to
    report.write_report(report.build_report(_rows(c, pid)), out, c, pid)
    table = json.loads(open(c.download_artifacts(pid, "report/comparison.json", str(tmp_path / "again"))).read())
    assert len(table["data"]) == 4


def test_a_failed_child_still_renders_marked_failed(mlflow_uri, tmp_path):
    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, "report_failed")
    pid = c.create_run(exp, run_name="sweep").info.run_id
    _run(c, exp, "ok", pid)
    bad = _run(c, exp, "broken", pid, status="FAILED", levers={"precision": "bf16"}, curve=(3.0,))
    rep = report.build_report(report.load_runs(c, parent=pid))
    md = report.write_report(rep, tmp_path, c, pid).read_text()
    assert "| bf16 | **FAILED** |" in md
    assert "bf16 FAILED, so it has no figures" in rep.summary
    assert rep.baseline.run_id != bad


def test_the_command_line_reports_an_experiment_or_runs(sweep, tmp_path):
    c, exp, pid, ids = sweep
    name = c.get_experiment(exp).name
    uri = c.tracking_uri
    assert report.main(["--experiment", name, "--tracking-uri", uri, "--out", str(tmp_path / "e")]) == 0
    with (tmp_path / "e" / "report.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4  # the parent is not a job
    assert report.main(["--runs", ids["base"], ids["l1"], "--tracking-uri", uri, "--baseline", "pruning=none",
                        "--out", str(tmp_path / "r")]) == 0
    assert "l1_unstructured" in (tmp_path / "r" / "report.md").read_text()
    assert report.main(["--runs", ids["base"], "--tracking-uri", uri, "--baseline", "precision=fp7",
                        "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("which", ["--parent", "--runs"])
def test_a_run_id_the_store_does_not_hold_is_one_line_naming_it(sweep, tmp_path, capsys, which):
    c, _, _, ids = sweep
    unknown = "f" * 32
    argv = [which, unknown] + ([ids["base"]] if which == "--runs" else [])
    assert report.main([*argv, "--tracking-uri", c.tracking_uri, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"costlab: error: {which} {unknown}: no such run in this store\n"


def test_the_sweep_callback_turns_a_failure_into_one_warning_line(mlflow_uri, tmp_path, capsys):
    (tmp_path / "parent_run_id").write_text("0" * 32)  # no such run
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "tracking": {"uri": mlflow_uri},
                            "report": {"baseline": None}})
    report.SweepReport().on_multirun_end(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("costlab: warning: no report for this sweep")


def test_the_report_imports_without_torch():
    code = "import sys, costlab.report; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_only_runs_that_trained_differently_are_compared_on_training_speed(sweep, mlflow_uri):
    c, exp, pid, ids = sweep
    rows = {r.run_id: r for r in _rows(c, pid)}
    base = rows[ids["base"]]
    assert report.trains_like(rows[ids["l1"]], base)  # pruned after training
    assert not report.trains_like(rows[ids["bf16"]], base)
    gradual = _run(c, exp, "gradual", pid, levers={"pruning": "l1_unstructured"},
                   params={"pruning.schedule": "gradual"}, tags={COMPRESSES_IN_TRAINING: "true"})
    lr = _run(c, exp, "lr", pid, params={"trainer.lr": "0.001"})
    rows = {r.run_id: r for r in _rows(c, pid)}
    assert not report.trains_like(rows[gradual], base) and not report.trains_like(rows[lr], base)


def test_the_keys_a_sweep_varied_label_its_runs(mlflow_uri):
    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, "report_swept")
    pid = c.create_run(exp, run_name="search", tags={"costlab.sweep.varied": "pruning,pruning.amount"}).info.run_id
    _run(c, exp, "a", pid, levers={"pruning": "structured"}, params={"pruning.amount": "0.0"})
    _run(c, exp, "b", pid, levers={"pruning": "l1_unstructured"}, params={"pruning.amount": "0.5"})
    rows = report.load_runs(c, parent=pid)
    # each lever has one amount here, so only the sweep's record says the amount was searched
    assert [r.label for r in report.build_report(rows).rows] == ["structured", "l1_unstructured"]
    labelled = report.build_report(rows, swept=report.swept_keys(c, pid))
    assert [r.label for r in labelled.rows] == ["structured amount=0.0", "l1_unstructured amount=0.5"]


@pytest.mark.parametrize("col, value, shown", [
    ("eval/loss", 3.16254, "3.1625"), ("train/final_loss", 3.0, "3.0000"), ("eval/loss delta", 0.0046, "+0.46 %"),
    ("serve/kv_eval_loss", 2.5, "2.5000"),
    # figures named after a loss are not losses: a byte count and the loss scale read as the numbers they are
    ("mem/predicted_loss_backward_bytes_per_rank", 5041664.0, "5,041,664"), ("train/loss_scale", 65536.0, "65,536"),
])
def test_only_losses_are_shown_to_four_decimals(col, value, shown):
    from costlab.report.text import _fmt

    assert _fmt(col, value) == shown


def test_a_report_of_plans_compares_what_they_predict_on_their_card(mlflow_uri, tmp_path):
    """A sweep of plans (mode=plan; a plan search's candidates) trains nothing: its table is the plans' predicted
    memory, fit, tokens/s, MFU, money and hours on the card they name, and its summary says which fit, cheapest
    first, with the one that does not fit never ranked however cheap."""
    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, "report_plans")
    pid = c.create_run(exp, run_name="plans", tags={"costlab.role": "sweep"}).info.run_id
    plan = {"mode": "plan", "hardware": "h100_sxm"}
    figures = {"fsdp": (38.5e9, 41.5e9, 8468.0, 25.8), "ddp": (141e9, -60.8e9, 9000.0, 20.0),
               "fsdp_tp": (30e9, 50e9, 7000.0, 31.2)}
    for name, (memory, margin, tps, usd) in figures.items():
        _run(c, exp, f"plan llama_7b {name}", pid, levers={"parallelism": name, "world_size": "8"}, tags=plan,
             curve=(), metrics={k: None for k in BASE} | {
                 "plan/memory_bytes_per_device": memory, "plan/memory_margin_bytes": margin,
                 "plan/tokens_per_s": tps, "plan/mfu": tps / 2e4, "plan/usd": usd, "plan/hours": usd / 24})
    rep = report.build_report(report.load_runs(c, parent=pid), "parallelism=fsdp")
    assert rep.summary.startswith("Predicted on h100_sxm (plans: nothing was trained)")
    assert "ddp does not fit (by 60.8 GB)" in rep.summary
    assert rep.summary.endswith("2 of 3 fit; cheapest first: fsdp $25.8, fsdp_tp $31.2.")
    path = report.write_report(rep, tmp_path)
    text = path.read_text()
    assert "| plan/usd | plan/usd ratio |" in text and "eval/loss" not in text
    assert "| fsdp_tp | FINISHED | fsdp_tp | 30 GB | 0.78x | 50 GB | 7,000 | 0.83x |" in text
    assert "device h100_sxm" in text  # the card planned for, not the CPU the plans ran on
