"""A sweep's parent run and ``run.py``'s exit code under Hydra's launchers that run jobs in other processes
(joblib's worker pool, submitit's local executor): both come from the jobs' own records, not from
``run.py``'s memory."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.e2e

# The sweeps take 40-70 s each on a busy 2-core CPU, so they are marked slow (CI runs them);
# test_a_sweeps_verdict_counts_followers_and_jobs_that_died covers the verdict in the default suite.

# A corpus shorter than one training window passes validation (any positive size is a valid corpus
# size) and fails in the workers when they build the data.
TOO_SHORT = "data.n_bytes=20"


def _tiny(*replace: str) -> list[str]:
    keys = {o.split("=", 1)[0] for o in replace}
    return [o for o in TINY if o.split("=", 1)[0] not in keys] + list(replace)


def _sweep(cli, experiment: str):
    runs = cli.runs(experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def _job_statuses(cli) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["status"] for p in (cli.out / "multirun").glob("*/job_status")}


PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher"}


def _needs(launcher: str) -> None:
    if launcher in PLUGINS:
        pytest.importorskip(PLUGINS[launcher], reason="pip install -e '.[dev]'")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_job_failing_at_run_time_fails_the_sweep_and_its_exit_code(cli, launcher):
    _needs(launcher)
    experiment = f"fails_{launcher}"
    proc = cli("-m", f"hydra/launcher={launcher}", *_tiny("data.n_bytes=20000,20"),
               f"tracking.experiment_name={experiment}", timeout=300)
    assert "costlab: sweep FAILED: 1 of 2 jobs finished" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1
    if launcher == "joblib":  # jobs side by side on this console, each line naming its job
        assert proc.stderr.count("rank(s) in") == 2  # each run said where it is before its ranks started
        assert "[job 0] step 1/4" in proc.stdout  # the job that trains (the other fails building its data)
    parent, children = _sweep(cli, experiment)
    assert parent.info.status == "FAILED"
    by_size = {r.data.params["data.n_bytes"]: r.info.status for r in children}
    assert by_size == {"20000": "FINISHED", "20": "FAILED"}
    assert sorted(_job_statuses(cli).values()) == ["FAILED", "FINISHED"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local"])  # joblib's: a sweep with a failing job (above)
def test_a_sweep_in_other_processes_makes_one_finished_parent_with_two_children(cli, launcher):
    _needs(launcher)
    experiment = f"sweep_{launcher}"
    proc = cli("-m", f"hydra/launcher={launcher}", *TINY, "precision=fp32,bf16",
               f"tracking.experiment_name={experiment}", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "costlab: sweep FINISHED: 2 of 2 jobs finished" in proc.stderr
    parent, children = _sweep(cli, experiment)
    assert parent.info.status == "FINISHED"
    assert sorted((r.data.tags["precision"], r.info.status) for r in children) == [
        ("bf16", "FINISHED"), ("fp32", "FINISHED")]
    assert _job_statuses(cli) == {"0": "FINISHED", "1": "FINISHED"}


def test_a_single_job_failing_at_run_time_exits_non_zero(cli):
    proc = cli(*_tiny(TOO_SHORT), "tracking.run_name=too_short", timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert cli.run_by_name("too_short").info.status == "FAILED"
    assert json.loads((cli.out / "run" / "job_status").read_text())["status"] == "FAILED"


def test_a_sweeps_verdict_counts_followers_and_jobs_that_died(mlflow_uri, tmp_path):
    """A follower node opens no MLflow run, so only its status file can fail the sweep; a job killed
    outright leaves its child RUNNING and its file RUNNING: both count as failed, and the child is closed."""
    from costlab import status
    from costlab.tracking.store import client, experiment_id
    from costlab.tracking.sweep import sweep_outcome

    c = client(mlflow_uri)
    exp = experiment_id(mlflow_uri, "verdicts")
    parent = c.create_run(exp).info.run_id
    done, died = (c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id for _ in range(2))
    c.set_terminated(done, "FINISHED")
    for job in ("0", "1", "old"):
        (tmp_path / job).mkdir()
    status.write(tmp_path / "0", "FINISHED", node_rank=0, run_id=done, parent_run_id=parent)
    status.write(tmp_path / "1", "RUNNING", node_rank=0, run_id=died, parent_run_id=parent)
    status.write(tmp_path / "0", "FINISHED", node_rank=1, parent_run_id=parent)
    status.write(tmp_path / "old", "FAILED", node_rank=0, run_id="x", parent_run_id="another sweep")
    assert sweep_outcome(c, parent, tmp_path) == {done: "FINISHED", died: "FAILED",
                                                  str(tmp_path / "0" / "job_status.node1"): "FINISHED"}
    assert c.get_run(died).info.status == "FAILED"

    status.write(tmp_path / "0", "FAILED", node_rank=1, parent_run_id=parent)
    jobs = sweep_outcome(c, parent, tmp_path)
    assert jobs[str(tmp_path / "0" / "job_status.node1")] == "FAILED"
    assert status.worst(jobs.values()) == "FAILED" and status.exit_code("FAILED") == 1
    assert status.worst(["FINISHED", "KILLED", "FAILED"]) == "KILLED" and status.exit_code("KILLED") == 130
    assert status.worst([]) == "FINISHED"
