"""A sweep's parent run: opened when a multirun starts, every job its child, closed with the jobs' verdict."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from costlab import status
from costlab.schema import ConfigError
from costlab.tracking.runs import check_tracking, create_run
from costlab.tracking.store import client, experiment_id, pages

if TYPE_CHECKING:  # mlflow is imported only when a store is used: it is slow to import
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


PARENT_ID_FILE = "parent_run_id"


ROLE_TAG, SWEEP_ROLE = "costlab.role", "sweep"  # marks a sweep's parent run


SWEEP_DIR_TAG = "costlab.sweep_dir"




SWEEP_FILE = "sweep.json"


SWEPT_TAG = "costlab.sweep.varied"  # on the parent: the keys the sweep varies, comma-separated


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: swept on the command line (``a=1,2``) or by the sweeper's ``params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    keys += [str(k) for k in OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}]
    return list(dict.fromkeys(k.lstrip("+~") for k in keys))


def sweep_info(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class SweepParentRun(Callback):
    """Opens one parent run per multirun, every job of the sweep its child, and closes it with the
    verdict of its jobs; that verdict, or a single job's status, also becomes ``run.py``'s exit code.

    The parent's id is written into the sweep folder, where jobs (in this process, in a joblib worker,
    or on another machine with a remote launcher) find it. The jobs' statuses are read back from the
    MLflow children of the parent and from the status files the jobs wrote (:mod:`costlab.status`),
    never from this process's memory, so the verdict is the same under every launcher.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            check_tracking(config)
        except ConfigError as e:
            status.refuse(e)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        c = client(config.tracking.uri)
        name = f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"
        exp = experiment_id(config.tracking.uri, config.tracking.experiment_name)
        run_id = create_run(c, config.tracking.uri, exp, name, {SWEEP_DIR_TAG: str(sweep_dir), ROLE_TAG: SWEEP_ROLE})
        c.log_param(run_id, "overrides", " ".join(config.hydra.overrides.task))
        varied = swept_keys(config)
        c.set_tag(run_id, SWEPT_TAG, ",".join(varied)[:5000])
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"name": name, "varied": varied}))
        (sweep_dir / PARENT_ID_FILE).write_text(run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        parent_id = parent_run_id(str(sweep_dir))
        if parent_id is None:
            return
        c = client(config.tracking.uri)
        jobs = sweep_outcome(c, parent_id, sweep_dir)
        verdict = status.worst(jobs.values())
        c.set_terminated(parent_id, verdict)
        failed = sum(s != status.FINISHED for s in jobs.values())
        print(f"costlab: sweep {verdict}: {len(jobs) - failed} of {len(jobs)} jobs finished ({sweep_dir})",
              file=sys.stderr)
        if verdict != status.FINISHED:
            # Hydra swallows exceptions from callbacks but lets SystemExit through. This callback is
            # listed first, and Hydra calls on_multirun_end in reverse order, so it runs last.
            raise SystemExit(status.exit_code(verdict))

    def on_run_end(self, config: DictConfig, job_return: JobReturn | None = None, **kwargs: Any) -> None:
        # A job that raised is reported by Hydra itself; one that returned (its value is the optimized
        # metric) after its workers failed must still end run.py with a non-zero code: its status file says so.
        if job_return is not None and job_return.status == JobStatus.COMPLETED:
            records = status.job_records(Path(config.hydra.runtime.output_dir))
            verdict = status.worst(r.status for r in records)
            if verdict != status.FINISHED:
                raise SystemExit(status.exit_code(verdict))


def child_runs(c: MlflowClient, parent_id: str) -> list[Run]:
    """Every MLflow run whose ``mlflow.parentRunId`` is ``parent_id``, in the parent's experiment."""
    experiment = c.get_run(parent_id).info.experiment_id
    return list(pages(c.search_runs, [experiment], f"tags.mlflow.parentRunId = '{parent_id}'"))


def sweep_outcome(c: MlflowClient, parent_id: str, sweep_dir: Path) -> dict[str, str]:
    """The status of each job of a finished sweep, keyed by run id (or, for a follower node, status file).

    A child still RUNNING once every job has returned lost its owner (killed outright, say): it is
    closed FAILED here, so no run stays RUNNING. A status file still RUNNING counts as FAILED too.
    """
    jobs: dict[str, str] = {}
    for run in child_runs(c, parent_id):
        if run.info.status == status.RUNNING:
            c.set_terminated(run.info.run_id, status.FAILED)
            jobs[run.info.run_id] = status.FAILED
        else:
            jobs[run.info.run_id] = run.info.status
    for record in status.sweep_records(sweep_dir, parent_id):
        key = record.run_id if record.node_rank == 0 and record.run_id else str(record.path)
        jobs[key] = status.worst([jobs.get(key, status.FINISHED), record.status])
    return jobs


def parent_run_id(sweep_dir: str) -> str | None:
    path = Path(sweep_dir) / PARENT_ID_FILE
    return path.read_text().strip() if path.exists() else None
