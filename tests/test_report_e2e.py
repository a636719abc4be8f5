"""A sweep's answer and a search over the levers, as a user runs them: real ``run.py`` sweeps, real torchrun
jobs, a real SQLite store, everything checked from MLflow alone. Each sweep takes a minute or more on
2 cores, so these are slow tests."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from costlab import ROOT
from tests.conftest import TINY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

optuna_sweeper = "hydra_plugins.hydra_optuna_sweeper"


def _sweep(cli, experiment: str):
    runs = cli.runs(experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return parents[0], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def _table(cli, parent_id: str, tmp_path) -> list[dict]:
    path = cli.client().download_artifacts(parent_id, "report/comparison.json", str(tmp_path))
    table = json.loads(open(path).read())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def test_a_2x2_sweep_ends_with_its_report_and_tags_every_child(cli, tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    proc = cli("-m", *TINY, "precision=fp32,bf16", "pruning=none,l1_unstructured",
               "tracking.experiment_name=report_2x2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "costlab: report: " in proc.stderr and "costlab: sweep FINISHED: 4 of 4 jobs finished" in proc.stderr
    parent, children = _sweep(cli, "report_2x2")
    assert len(children) == 4 and {c.info.status for c in [parent, *children]} == {"FINISHED"}
    assert len(cli.runs("report_2x2")) == 5
    assert len({c.info.run_name for c in children}) == 4

    # the table: one row per child, ratios equal the ratios of the children's own metrics
    rows = {row["run_id"]: row for row in _table(cli, parent.info.run_id, tmp_path)}
    assert set(rows) == {c.info.run_id for c in children}
    by_levers = {(c.data.tags["precision"], c.data.tags["pruning"]): c for c in children}
    base = by_levers[("fp32", "none")]
    assert rows[base.info.run_id]["baseline"] is True
    for child in children:
        row, m, b = rows[child.info.run_id], child.data.metrics, base.data.metrics
        assert row["perf/tokens_per_s ratio"] == pytest.approx(m["perf/tokens_per_s"] / b["perf/tokens_per_s"])
        assert row["model/size_bytes ratio"] == pytest.approx(m["model/size_bytes"] / b["model/size_bytes"])
        # (the MLflow table is JSON written by pandas with 10 decimals)
        assert row["eval/loss delta"] == pytest.approx(m["eval/loss"] / b["eval/loss"] - 1, abs=1e-9)
        assert row["infer/latency_ms_p50 speed-up"] == pytest.approx(
            b["infer/latency_ms_p50"] / m["infer/latency_ms_p50"])
    artifacts = {a.path for a in cli.client().list_artifacts(parent.info.run_id, "report")}
    for png in ("pareto_throughput", "pareto_size", "pareto_latency", "loss_curves", "memory"):
        assert f"report/{png}.png" in artifacts
        assert (cli.out / "multirun" / "report" / f"{png}.png").stat().st_size > 1000
    md = open(cli.client().download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))).read()
    summary = md.split("\n\n")[1]
    assert summary.startswith("Against the baseline") and "l1_unstructured" in summary and "bf16" in summary

    # every child: the sweep's tags, the commit it ran from, the corpus it trained on
    for child in children:
        tags = child.data.tags
        assert tags["costlab.sweep.id"] == parent.info.run_id
        assert tags["costlab.sweep.name"] == parent.info.run_name
        assert tags["mlflow.source.git.commit"] == head
        inputs = child.inputs.dataset_inputs
        assert len(inputs) == 1 and inputs[0].dataset.name == "synthetic" and len(inputs[0].dataset.digest) == 32
    assert len({c.inputs.dataset_inputs[0].dataset.digest for c in children}) == 1
    assert parent.data.tags["mlflow.source.git.commit"] == head


def test_an_optuna_search_returns_the_metric_of_each_trial(cli):
    pytest.importorskip(optuna_sweeper, reason="pip install -e '.[search]'")
    proc = cli("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=7", *TINY,
               "trainer.lr=interval(0.001,0.01)", "tracking.experiment_name=optuna_single", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, children = _sweep(cli, "optuna_single")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    # the swept override is in every default run name, so the trials are told apart
    assert all("trainer.lr=" in c.info.run_name for c in children) and len({c.info.run_name for c in children}) == 3
    result = yaml.safe_load((cli.out / "multirun" / "optimization_results.yaml").read_text())
    assert result["best_value"] == min(c.data.metrics["eval/loss"] for c in children)


def test_a_multi_objective_search_survives_a_refused_trial_and_reports_it(cli):
    pytest.importorskip(optuna_sweeper, reason="pip install -e '.[search]'")
    proc = cli("-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", *TINY, "precision=choice(fp32,fp8)",
               "optimized_metric=[eval/loss,model/size_bytes]", "hydra.sweeper.direction=[minimize,minimize]",
               "tracking.experiment_name=optuna_multi", timeout=600)
    # fp8 needs a Hopper/Ada GPU: that trial is refused in one line, the study goes on and ends
    assert "precision=fp8" in proc.stderr and "(this trial fails; the search goes on)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1 and "costlab: sweep FAILED: 1 of 2 jobs finished" in proc.stderr
    parent, children = _sweep(cli, "optuna_multi")
    status = {c.data.tags["precision"]: c for c in children}
    assert {k: c.info.status for k, c in status.items()} == {"fp32": "FINISHED", "fp8": "FAILED"}
    assert "costlab.error" in status["fp8"].data.tags
    m = status["fp32"].data.metrics
    result = yaml.safe_load((cli.out / "multirun" / "optimization_results.yaml").read_text())
    # the refused trial counted as the worst of both objectives: the front is the trial that ran
    assert [s["values"] for s in result["solutions"]] == [[m["eval/loss"], m["model/size_bytes"]]]
    # the report still renders, the refused trial marked
    md = (cli.out / "multirun" / "report" / "report.md").read_text()
    assert "**FAILED**" in md and "FAILED, so it has no figures" in md
    assert parent.info.status == "FAILED"
