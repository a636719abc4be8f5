"""MLflow bookkeeping: the run a job owns, the parent run of a sweep, and a non-blocking metric logger.

Only the launcher (``run.py``) opens and closes runs; workers log metrics into the run whose id they
are handed, from rank 0, through :class:`MetricLogger`, which batches writes in a background thread
so the training loop never waits on the database.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

PARENT_ID_FILE = "parent_run_id"
CONTRACT_TAGS = ("model", "data", "parallelism", "precision", "pruning", "quantization")


def client(uri: str):
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


def open_run(cfg: DictConfig, tags: dict[str, str], run_name: str | None, parent_id: str | None) -> str:
    """Create the job's run with the flattened config as params; return its id."""
    from mlflow.entities import Param

    c = client(cfg.tracking.uri)
    all_tags = dict(tags)
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    run = c.create_run(experiment_id(cfg.tracking.uri, cfg.tracking.experiment_name), run_name=run_name, tags=all_tags)
    params = [Param(k, v) for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


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
    """Opens one parent run per multirun; every job of the sweep becomes its child.

    The parent's id is written into the sweep folder, where jobs (in this process or on another
    machine with a remote launcher) find it. The parent ends FAILED if any child failed.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from costlab import launch

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            launch.check_tracking(config)
        except launch.ConfigError as e:
            launch.fail(e, None, None)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        c = client(config.tracking.uri)
        run = c.create_run(
            experiment_id(config.tracking.uri, config.tracking.experiment_name),
            run_name=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}",
            tags={"costlab.sweep_dir": str(sweep_dir), "costlab.role": "sweep"},
        )
        c.log_param(run.info.run_id, "overrides", " ".join(config.hydra.overrides.task))
        (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from costlab import launch

        path = Path(config.hydra.sweep.dir) / PARENT_ID_FILE
        if path.exists():
            status = "FAILED" if launch.FAILED_JOBS else "FINISHED"
            client(config.tracking.uri).set_terminated(path.read_text().strip(), status)


def parent_run_id(sweep_dir: str) -> str | None:
    path = Path(sweep_dir) / PARENT_ID_FILE
    return path.read_text().strip() if path.exists() else None
