"""What a job returns to Hydra's sweeper: its optimized_metric, read back from MLflow, or the worst value."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig

from costlab import status, tracking
from costlab.measure.names import PLAN_MARGIN
from costlab.schema import ConfigError

Objective = float | list[float]


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def searching(hc: DictConfig) -> bool:
    """Whether a sweeper that searches (Optuna, not Hydra's basic grid) reads what this job returns."""
    return hc.mode == RunMode.MULTIRUN and hc.sweeper.get("_target_") != BASIC_SWEEPER


def objective(cfg: DictConfig, outcome: str, run_id: str | None, directions: Sequence[str] = (),
              warn: bool = True) -> Objective:
    """What the Hydra task returns, for sweepers that search (Optuna): the run's ``optimized_metric`` (a
    float, or a list for several objectives) as logged in MLflow.

    A job that did not finish, did not log the metric, or planned a layout that does not fit
    (``plan/memory_margin_bytes`` < 0), gets the worst value of each objective (+inf when
    minimised, -inf when maximised, per ``directions``): the study goes on, its best value and Pareto front
    are those of the jobs that ran, and the sampler learns to avoid what failed. (NaN would be Optuna's
    "failed trial", but the Optuna 2 that hydra-optuna-sweeper installs ends the whole study on it.)
    ``warn=False`` where nothing searches on the value (a single run, a grid): a metric the job never logs
    (a plan logs no ``eval/loss``) is then no news.
    """
    names = cfg.get("optimized_metric") or []
    names = [str(names)] if isinstance(names, str) else [str(n) for n in names]
    finished = run_id is not None and outcome == status.FINISHED
    metrics = tracking.client(cfg.tracking.uri).get_run(run_id).data.metrics if finished else {}
    unfit = metrics.get(PLAN_MARGIN, 0.0) < 0  # a plan of a layout that does not fit: no cost of it counts
    if warn and unfit:
        print(f"costlab: warning: plan {run_id} does not fit ({PLAN_MARGIN} < 0): returning the worst value",
              file=sys.stderr)
    metrics = {} if unfit else metrics
    missing = [n for n in names if n not in metrics]
    if warn and finished and missing and not unfit:
        print(f"costlab: warning: run {run_id} logged no {', '.join(missing)} (optimized_metric): "
              "returning the worst value", file=sys.stderr)
    worst = [-math.inf if i < len(directions) and "max" in str(directions[i]) else math.inf for i in range(len(names))]
    values = [float(metrics[n]) if n in metrics else w for n, w in zip(names, worst, strict=True)]
    return values[0] if len(values) == 1 else values


def directions(hc: DictConfig) -> list[str]:
    """The search's directions (Optuna's ``hydra.sweeper.direction``: one, or a list), or none."""
    d = hc.sweeper.get("direction")  # a string, an enum (Optuna's default) or a list of either
    if d is None:
        return []
    return [str(x) for x in d] if isinstance(d, list | tuple | ListConfig) else [str(d)]


def refuse_trial(cfg: DictConfig, error: ConfigError, run_dir: Path, parent_id: str | None, tags: dict[str, str],
                 hc: DictConfig) -> Objective:
    """A search proposed a configuration this machine cannot run: this trial fails, the search goes on.
    One line says why; the trial's run is recorded FAILED with the reason, never left RUNNING."""
    print(f"costlab: error: {error} (this trial fails; the search goes on)", file=sys.stderr)
    status.write(run_dir, status.FAILED, node_rank=0, parent_run_id=parent_id)
    run_id = None
    if parent_id:
        c = tracking.client(cfg.tracking.uri)
        tags = {**tags, "mlflow.parentRunId": parent_id, tracking.SWEEP_ID_TAG: parent_id,
                tracking.ERROR_TAG: str(error)}
        sweep_name = tracking.sweep_info(hc.sweep.dir).get("name")
        if sweep_name:
            tags[tracking.SWEEP_NAME_TAG] = sweep_name
        run_id = tracking.create_run(c, cfg.tracking.uri, c.get_run(parent_id).info.experiment_id,
                                     f"refused {error.key}={error.value}", tags)
        c.set_terminated(run_id, status.FAILED)
        status.write(run_dir, status.FAILED, node_rank=0, run_id=run_id, parent_run_id=parent_id)
    return objective(cfg, status.FAILED, run_id, directions(hc))
