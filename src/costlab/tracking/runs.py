"""The runs a job owns: created with provenance and params, closed when their owner leaves; and runs whose
owner is gone."""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from costlab import faults, status
from costlab.events import FAILURE_TAG
from costlab.files import corpus_digest
from costlab.schema import ConfigError, option
from costlab.tracking.store import client, experiment_id, pages, prepare_store

if TYPE_CHECKING:  # mlflow is imported only when a store is used: it is slow to import
    from mlflow.tracking import MlflowClient


SWEEP_ID_TAG, SWEEP_NAME_TAG = "costlab.sweep.id", "costlab.sweep.name"  # on every child: filter a sweep in the UI
CONTRACT_TAGS = ("model", "data", "parallelism", "precision", "optimizer", "finetune", "pruning", "quantization")


ERROR_TAG = "costlab.error"  # why a run was refused


OWNER_TAG = "costlab.owner"  # host:pid:start of the process that opened the run (costlab.faults.owner)


def create_run(c: MlflowClient, uri: str, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
    """Create a run owned by this process (tagged with :func:`costlab.faults.owner`), so that
    :func:`close_abandoned` finds it if this process leaves before closing it itself."""
    run = c.create_run(experiment, run_name=run_name, tags=provenance({**tags, OWNER_TAG: faults.owner()}))
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> str:
    """Mark a KILLED or FAILED run RUNNING again, owned by this process (``trainer.resume``)."""
    c = client(uri)
    c.update_run(run_id, status=status.RUNNING)
    c.set_tag(run_id, OWNER_TAG, faults.owner())
    c.set_tag(run_id, FAILURE_TAG, "")
    return run_id


def close_abandoned(uri: str, outcome: str) -> list[str]:
    """Close, with ``outcome``, every run of the store ``uri`` that this process owns (its
    :data:`OWNER_TAG`) and that is still RUNNING: the way out of ``run.py`` on a signal or an error, wherever
    it came (between the jobs of a sweep, while a run opens). The store says which runs are this process's:
    no list of them is kept in memory."""
    c = client(uri)
    experiments = [e.experiment_id for e in pages(c.search_experiments)]
    mine = f"attributes.status = 'RUNNING' and tags.`{OWNER_TAG}` = '{faults.owner()}'"
    closed = []
    for run in pages(c.search_runs, experiments, mine) if experiments else ():
        c.set_terminated(run.info.run_id, outcome)
        closed.append(run.info.run_id)
    return closed


def close_orphans(uri: str, experiment: str) -> list[str]:
    """Close FAILED (tag ``costlab.failure=launcher_died``) the RUNNING runs of ``experiment`` that a process
    of this host opened and that process is gone: killed outright, it could not close them. A run is read again
    once its owner is found gone: an owner that closed its run and exited between the search and the check had
    closed it itself, and a gone owner can no longer change it."""
    c = client(uri)
    host = socket.gethostname().replace("'", "")
    closed = []
    for run in pages(c.search_runs, [experiment],
                     f"attributes.status = 'RUNNING' and tags.`{OWNER_TAG}` LIKE '{host}:%'"):
        if (faults.owner_alive(run.data.tags.get(OWNER_TAG, "")) is False
                and c.get_run(run.info.run_id).info.status == status.RUNNING):
            c.set_tag(run.info.run_id, FAILURE_TAG, "launcher_died")
            c.set_terminated(run.info.run_id, status.FAILED)
            closed.append(run.info.run_id)
    return closed


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def provenance(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` plus what ``mlflow.start_run`` would add: user, source file, git commit, branch and repository."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags)


def open_run(cfg: DictConfig, tags: dict[str, str], run_name: str | None, parent_id: str | None,
             sweep_name: str | None = None) -> str:
    """Create the job's run with provenance tags, the flattened config as params and the corpus as its
    dataset input; return its id. A run that cannot be set up is closed FAILED, never left RUNNING."""
    from mlflow.entities import Param

    c = client(cfg.tracking.uri)
    all_tags = dict(tags)
    if parent_id:
        all_tags.update({"mlflow.parentRunId": parent_id, SWEEP_ID_TAG: parent_id})
        if sweep_name:
            all_tags[SWEEP_NAME_TAG] = sweep_name
    exp = experiment_id(cfg.tracking.uri, cfg.tracking.experiment_name)
    run_id = create_run(c, cfg.tracking.uri, exp, run_name, all_tags)
    try:
        params = [Param(k, v) for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(run_id, params=params[i : i + 100])
        log_corpus(c, run_id, cfg.data)
    except BaseException as e:
        c.set_terminated(run_id, status.KILLED if isinstance(e, KeyboardInterrupt) else status.FAILED)
        raise
    return run_id


CORPUS_ATTEMPTS = 5  # a corpus's dataset input is logged again after another job's insert collided with it


def log_corpus(c: MlflowClient, run_id: str, data_cfg: DictConfig) -> None:
    """The training text as the run's MLflow dataset input: its source and a digest of its bytes."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source, files = option("data", data_cfg).corpus_files()
    dataset = Dataset(name=str(data_cfg.get("name", "data")), digest=corpus_digest(source, files),
                      source_type="local", source=json.dumps({"uri": source}))
    for attempt in range(CORPUS_ATTEMPTS):
        try:
            c.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])
            return
        except Exception as e:
            # the jobs of a sweep log one corpus at once: MLflow looks for the experiment's dataset, then inserts
            # it, so a job whose look came before another's insert collides with it; the dataset is there now,
            # and the call again links it (its transaction was rolled back whole)
            said = str(e).lower()
            collided = "datasets" in said and any(w in said for w in ("unique constraint", "duplicate"))
            if not collided or attempt == CORPUS_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def metrics_at(values: dict[str, float]) -> list:
    """MLflow ``Metric`` entities (step 0) for one ``log_batch``, stamped now."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(key, float(value), ts, 0) for key, value in values.items()]


def system_metrics(uri: str, run_id: str, interval_s: float, resumed: bool = False) -> Any:
    """MLflow's system metrics monitor for ``run_id`` (``system/*``: CPU and memory utilisation, disk, network,
    and GPU utilisation, memory and power where NVML reads them), sampling this machine every ``interval_s``
    seconds from a thread of the launcher that owns the run, until its ``finish()``; None when ``interval_s``
    is 0. A sample still being taken when the run ends is not logged; a resumed run's samples continue its
    steps."""
    if interval_s <= 0:
        return None
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop notes
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=uri)
    monitor.start()
    return monitor


def check_tracking(cfg: DictConfig, store_only: bool = False) -> None:
    """The tracking store must exist or be creatable; otherwise refuse before anything starts.

    ``store_only``: check the store as far as that needs no MLflow (a new SQLite store is still created):
    a path that cannot hold it, a wrong scheme, a server that does not answer. A training job checks the
    rest (the experiment, runs left RUNNING) while its ranks start."""
    uri = str(cfg.tracking.uri)
    name = cfg.tracking.experiment_name
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("tracking.experiment_name", repr(name), "must be a non-empty name")
    try:
        prepare_store(uri)
        if store_only:
            return
        exp = experiment_id(uri, name)
    except Exception as e:  # any failure to reach or create the store is the user's tracking.uri
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("tracking.uri", uri, f"cannot open or create the tracking store ({why})") from None
    for run_id in close_orphans(uri, exp):
        print(f"costlab: run {run_id} had lost its launcher; closed FAILED", file=sys.stderr)
