"""MLflow bookkeeping: the run a job owns, the parent run of a sweep, and the relay of what workers record.

Only the launcher (``run.py``) touches the store for a job: it opens and closes the run, and relays into
it (:class:`Relay`) the metrics and tags rank 0 writes into the run folder (:mod:`costlab.events`).
Workers never import MLflow.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from costlab import faults, status
from costlab.errors import ConfigError
from costlab.files import corpus_digest, corpus_files, write_whole

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
ERROR_TAG = "costlab.error"  # why a run was refused
FAILURE_TAG = "costlab.failure"  # why a run failed, where it is known: oom, launcher_died
OWNER_TAG = "costlab.owner"  # host:pid:start of the process that opened the run (costlab.faults.owner)
LOCKED_RETRY_S = 60.0  # how long a write waits out "database is locked" (SQLite, several writers)
RELAYED_FILE = "events.relayed"  # how many bytes of the run folder's events.jsonl the store holds
CONNECT_TIMEOUT_S = 3.0  # a tracking server that does not accept a connection within this is refused


class _Retrying:
    """An ``MlflowClient`` whose calls wait out SQLite's "database is locked" with backoff: several
    processes write one store (the jobs of a sweep, the ranks' loggers, the report)."""

    def __init__(self, inner: MlflowClient):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            delay, deadline = 0.05, time.monotonic() + LOCKED_RETRY_S
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as e:
                    if "database is locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(2.0, delay * 2)

        return call


def client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return _Retrying(MlflowClient(tracking_uri=uri))  # type: ignore[return-value]


def default_uri() -> str:
    """The store ``tracking.uri`` names by default (``conf/config.yaml``): where ``run.py`` logs unless told."""
    from costlab import CONF_DIR

    return str(OmegaConf.load(CONF_DIR / "config.yaml").tracking.uri)


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextmanager
def _store_lock(db: Path):
    """An exclusive lock beside the database file, between processes of this machine."""
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_store(uri: str) -> None:
    """Make the store usable, or raise ``OSError`` or ``ValueError``.

    A new SQLite store is created whole or not at all: MLflow builds its schema in a file of its own,
    which is renamed into place under a lock, so neither concurrent first runs nor a Ctrl-C during the
    creation can leave a half-migrated database. A server must accept a connection within seconds.
    """
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        if db.exists() and not db.is_file():
            raise ValueError(f"{db} is not a file")
        if not db.exists():
            with _store_lock(db):
                if not db.exists():
                    _create_sqlite(db)
    elif uri.startswith(("http://", "https://")):
        url = urlparse(uri)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ValueError(f"no tracking server answers at {url.hostname}:{port} ({e.strerror or e})") from None
    elif uri.startswith("file:") or "://" not in uri:
        raise ValueError("the file store is not supported by MLflow 3; use sqlite:///path/to/mlflow.db or http://host:port")


def _create_sqlite(db: Path) -> None:
    from mlflow.tracking import MlflowClient

    tmp = db.with_name(f".{db.name}.{os.getpid()}.new")
    tmp.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates and migrates
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the working directory
        artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=artifacts)
    except Exception:  # another process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --- runs this process opened, and runs whose owner is gone --------------------------------------------------

_opened: list[tuple[str, str]] = []  # (uri, run id) of every run this process created


def create_run(c: MlflowClient, uri: str, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
    """Create a run owned by this process (tagged with :func:`costlab.faults.owner`) and remember it, so
    :func:`close_abandoned` can close it if this process leaves before closing it itself."""
    run = c.create_run(experiment, run_name=run_name, tags=provenance({**tags, OWNER_TAG: faults.owner()}))
    _opened.append((uri, run.info.run_id))
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> str:
    """Mark a KILLED or FAILED run RUNNING again, owned by this process (``trainer.resume``)."""
    c = client(uri)
    c.update_run(run_id, status=status.RUNNING)
    c.set_tag(run_id, OWNER_TAG, faults.owner())
    c.set_tag(run_id, FAILURE_TAG, "")
    _opened.append((uri, run_id))
    return run_id


def close_abandoned(outcome: str) -> list[str]:
    """Close, with ``outcome``, every run this process created that is still RUNNING: the way out of
    ``run.py`` on a signal or an error, wherever it came (between the jobs of a sweep, while a run opens)."""
    closed = []
    for uri, run_id in _opened:
        try:
            c = client(uri)
            if c.get_run(run_id).info.status == status.RUNNING:
                c.set_terminated(run_id, outcome)
                closed.append(run_id)
        except Exception:  # the store went away: nothing more can be closed in it
            continue
    return closed


def close_orphans(uri: str, experiment: str) -> list[str]:
    """Close FAILED (tag ``costlab.failure=launcher_died``) the RUNNING runs of ``experiment`` that a process
    of this host opened and that process is gone: killed outright, it could not close them."""
    c = client(uri)
    host = socket.gethostname().replace("'", "")
    closed = []
    try:
        runs = c.search_runs([experiment], f"attributes.status = 'RUNNING' and tags.`{OWNER_TAG}` LIKE '{host}:%'",
                             max_results=1000)
    except Exception:  # a store that cannot search this way (old server): nothing to close
        return closed
    for run in runs:
        if faults.owner_alive(run.data.tags.get(OWNER_TAG, "")) is False:
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


def relay_rest(uri: str, run_id: str, run_dir: str | Path) -> BaseException | None:
    """Relay what the launcher had not relayed when it died (it records how far it got): rank 0's last act
    for a run whose ``run.py`` was killed outright."""
    done = Path(run_dir) / RELAYED_FILE
    try:
        offset = int(done.read_text())
    except (OSError, ValueError):
        offset = 0
    return Relay(uri, run_id, run_dir, resumed=True, offset=offset).close()


def metrics_at(values: dict[str, float]) -> list:
    """MLflow ``Metric`` entities (step 0) for one ``log_batch``, stamped now."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(key, float(value), ts, 0) for key, value in values.items()]


class Relay:
    """Writes what rank 0 records in the run folder (:mod:`costlab.events`) into the MLflow run, from a
    background thread of the launcher, every ``poll_s`` while the workers run and once more at
    :meth:`close`.

    Each (metric, step) reaches the store once: a worker attempt that starts again (torchrun restarted
    it, or ``trainer.resume`` reopened the run) re-runs the steps since its checkpoint, and those steps'
    metrics, already logged, are dropped.
    """

    def __init__(self, uri: str, run_id: str, run_dir: str | Path, resumed: bool = False, offset: int | None = None,
                 poll_s: float = 0.5, max_batch: int = 1000):
        """``offset``: where this job's lines start in the events file (by default its end now: lines before
        are earlier jobs'); ``resumed``: the run already holds metrics, and steps it holds are not logged again."""
        from costlab.events import events_path

        self._client = client(uri)
        self._run_id = run_id
        self._path = events_path(run_dir)
        self._done = self._path.with_name(RELAYED_FILE)
        if offset is None:
            offset = self._path.stat().st_size if self._path.exists() else 0
        self._offset = offset
        self._pending = b""
        self._poll_s, self._max_batch = poll_s, max_batch
        self._logged: dict[str, int] = {}  # key -> last step in the store
        self._skip: dict[str, int] = {}  # key -> last step an earlier attempt logged
        if resumed:
            for key in self._client.get_run(run_id).data.metrics:
                history = self._client.get_metric_history(run_id, key)
                self._logged[key] = max((m.step for m in history), default=-1)
            self._skip = dict(self._logged)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.flush_time_s = 0.0  # time spent writing to the store
        self._thread = threading.Thread(target=self._loop, name="costlab-relay", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # signals are the main thread's
        while not self._stop.wait(self._poll_s):
            try:
                self.pump()
            except Exception as e:  # reported by close(); the run goes on
                self.error = e
                return

    def pump(self) -> None:
        """Relay every complete line written since the last call."""
        from mlflow.entities import Metric, RunTag

        with self._lock:
            if not self._path.exists():
                return
            t0 = time.perf_counter()
            with self._path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            self._offset += len(chunk)
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            metrics: list[Metric] = []
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                if "start" in event:
                    self._skip = dict(self._logged)
                for key, value, ts, step in event.get("m", []):
                    if step > self._skip.get(key, -1):
                        metrics.append(Metric(key, value, ts, step))
                        self._logged[key] = max(step, self._logged.get(key, -1))
                if event.get("t"):
                    self._flush(metrics)
                    metrics = []
                    self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in event["t"].items()])
            self._flush(metrics)
            self.flush_time_s += time.perf_counter() - t0
            if chunk:  # how far the store holds the file: the rest is rank 0's to relay if run.py dies
                write_whole(self._done, f"{self._offset - len(self._pending)}\n")

    def _flush(self, metrics: list) -> None:
        for i in range(0, len(metrics), self._max_batch):
            self._client.log_batch(self._run_id, metrics=metrics[i : i + self._max_batch])

    def close(self) -> BaseException | None:
        """Stop the thread and relay what is left; return the first error met (the run lacks some of what
        its workers recorded), or None."""
        self._stop.set()
        self._thread.join()
        if self.error is None:
            try:
                self.pump()
            except Exception as e:
                self.error = e
        return self.error


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


def parent_run_id(sweep_dir: str) -> str | None:
    path = Path(sweep_dir) / PARENT_ID_FILE
    return path.read_text().strip() if path.exists() else None
