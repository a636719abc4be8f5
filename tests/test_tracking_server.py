"""The same run logged to a real ``mlflow server`` over HTTP (what parallel sweeps should use)."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_ddp_run_logs_to_a_real_mlflow_server(cli, mlflow_server):
    proc = cli(*TINY, "parallelism=ddp", f"tracking.uri={mlflow_server}", "tracking.run_name=over_http")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("costlab")
    (run,) = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'over_http'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
