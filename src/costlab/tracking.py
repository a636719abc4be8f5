"""MLflow bookkeeping: the run a job owns, the parent run of a sweep, and a non-blocking metric logger.

Only the launcher (``run.py``) opens and closes runs; workers log metrics into the run whose id they
are handed, from rank 0, through :class:`MetricLogger`, which batches writes in a background thread
so the training loop never waits on the database.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from costlab import status
from costlab.errors import ConfigError
from costlab.files import corpus_digest, corpus_files

if TYPE_CHECKING:  # mlflow is imported only when a store is used: it is slow to import
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

PARENT_ID_FILE = "parent_run_id"
CONTRACT_TAGS = ("model", "data", "parallelism", "precision", "pruning", "quantization")
ROLE_TAG, SWEEP_ROLE = "costlab.role", "sweep"  # marks a sweep's parent run
SWEEP_DIR_TAG = "costlab.sweep_dir"
SWEEP_ID_TAG, SWEEP_NAME_TAG = "costlab.sweep.id", "costlab.sweep.name"  # on every child: filter a sweep in the UI
SWEEP_FILE = "sweep.json"
SWEPT_TAG = "costlab.sweep.varied"  # on the parent: the keys the sweep varies, comma-separated
ERROR_TAG = "costlab.error"  # why a run was refused  # the sweep's name and the keys it varies, for its jobs


def client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def prepare_store(uri: str) -> None:
    """Create the folder of a SQLite store; raise ``OSError`` or ``ValueError`` when that is impossible."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} is not a file")
    elif uri.startswith("file:") or "://" not in uri:
        raise ValueError("the file store is not supported by MLflow 3; use sqlite:///path/to/mlflow.db or http://host:port")


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the working directory
        artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return c.create_experiment(name, artifact_location=artifacts)


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
    run = c.create_run(exp, run_name=run_name, tags=provenance(all_tags))
    try:
        params = [Param(k, v) for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(run.info.run_id, params=params[i : i + 100])
        log_corpus(c, run.info.run_id, cfg.data)
    except BaseException:
        c.set_terminated(run.info.run_id, status.FAILED)
        raise
    return run.info.run_id


def log_corpus(c: MlflowClient, run_id: str, data_cfg: DictConfig) -> None:
    """The training text as the run's MLflow dataset input: its source and a digest of its bytes."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source, files = corpus_files(OmegaConf.to_container(data_cfg, resolve=True))
    dataset = Dataset(name=str(data_cfg.get("name", "data")), digest=corpus_digest(source, files),
                      source_type="local", source=json.dumps({"uri": source}))
    c.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])


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


class MetricLogger:
    """Buffers ``(key, value, step)`` and writes them with ``log_batch`` from a background thread."""

    def __init__(self, uri: str, run_id: str, flush_every_s: float = 2.0, max_batch: int = 1000):
        self._client = client(uri)
        self._run_id = run_id
        self._queue: queue.Queue = queue.Queue()
        self._flush_every_s = flush_every_s
        self._max_batch = max_batch
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.time_spent_s = 0.0  # time the caller spent in log(): what logging costs the hot path
        self.flush_time_s = 0.0  # time the background thread spent writing to the store
        self._thread = threading.Thread(target=self._loop, name="costlab-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        t0 = time.perf_counter()
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            self._queue.put((key, float(value), ts, step))
        self.time_spent_s += time.perf_counter() - t0

    def _drain(self) -> None:
        from mlflow.entities import Metric

        t0 = time.perf_counter()
        batch = []
        while True:
            try:
                key, value, ts, step = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(Metric(key, value, ts, step))
        for i in range(0, len(batch), self._max_batch):
            self._client.log_batch(self._run_id, metrics=batch[i : i + self._max_batch])
        self.flush_time_s += time.perf_counter() - t0

    def _loop(self) -> None:
        while not self._stop.wait(self._flush_every_s):
            try:
                self._drain()
            except Exception as e:  # surface on close(), never kill training for a logging hiccup
                self._error = e

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        if self._error is not None:
            raise RuntimeError(f"metric logging failed: {self._error}") from self._error


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
        run = c.create_run(
            experiment_id(config.tracking.uri, config.tracking.experiment_name),
            run_name=name,
            tags=provenance({SWEEP_DIR_TAG: str(sweep_dir), ROLE_TAG: SWEEP_ROLE}),
        )
        c.log_param(run.info.run_id, "overrides", " ".join(config.hydra.overrides.task))
        varied = swept_keys(config)
        c.set_tag(run.info.run_id, SWEPT_TAG, ",".join(varied)[:5000])
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"name": name, "varied": varied}))
        (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)

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
    runs: list[Run] = []
    token = None
    while True:
        page = c.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'", page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


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


def check_tracking(cfg: DictConfig) -> None:
    """The tracking store must exist or be creatable; otherwise refuse before anything starts."""
    uri = str(cfg.tracking.uri)
    try:
        prepare_store(uri)
        experiment_id(uri, cfg.tracking.experiment_name)
    except Exception as e:  # any failure to reach or create the store is the user's tracking.uri
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("tracking.uri", uri, f"cannot open or create the tracking store ({why})") from None


def parent_run_id(sweep_dir: str) -> str | None:
    path = Path(sweep_dir) / PARENT_ID_FILE
    return path.read_text().strip() if path.exists() else None
