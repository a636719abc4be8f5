"""A run's serving ladder (``<run dir>/serve_ladder.json``, measured by rank 0: costlab/measure/serving.py)
logged into its MLflow run by the launcher that owns the run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from costlab.report.plots import serving_ladder

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def log_ladder(c: MlflowClient, run_id: str, path: Path) -> None:
    """A worker's serving ladder (``serve_ladder.json``) into its run: each rung's figures at the step of its
    concurrency (the UI's curves), the ladder as an MLflow table, and, where matplotlib is installed, the
    throughput-latency figure."""
    from mlflow.entities import Metric

    ladder = json.loads(path.read_text())
    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), ts, int(step))
                                 for step, figures in ladder["steps"].items() for k, v in figures.items()])
    c.log_table(run_id, data=ladder["table"], artifact_file="serve/ladder.json")
    try:
        fig = serving_ladder(ladder["table"], ladder["target"]["tpot_ms_p99"])
    except ImportError:  # the report extra (matplotlib) is not installed: the table and the metrics say it all
        return
    if fig is not None:
        c.log_figure(run_id, fig, "serve/ladder.png")
