"""The relay of what rank 0 records: the metrics and tags it appends to the run folder
(:mod:`costlab.events`) go into the MLflow run from a thread of ``run.py`` (:class:`Relay`).

Only launcher-side processes touch the store; the ranks never import MLflow. When ``run.py`` was killed
outright, rank 0 starts ``python -m costlab.tracking.relay URI RUN_ID RUN_DIR``, which relays what was left
and closes the run FAILED (:func:`close_orphaned`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from costlab.files import write_whole
from costlab.tracking.store import client

if TYPE_CHECKING:  # mlflow is imported only when a store is used: it is slow to import
    pass


RELAYED_FILE = "events.relayed"  # how many bytes of the run folder's events.jsonl the store holds


def relay_rest(uri: str, run_id: str, run_dir: str | Path) -> BaseException | None:
    """Relay what the launcher had not relayed when it died (it records how far it got): rank 0's last act
    for a run whose ``run.py`` was killed outright."""
    done = Path(run_dir) / RELAYED_FILE
    try:
        offset = int(done.read_text())
    except (OSError, ValueError):
        offset = 0
    return Relay(uri, run_id, run_dir, resumed=True, offset=offset).close()


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


def close_orphaned(uri: str, run_id: str, run_dir: str | Path) -> None:
    """Relay what a killed launcher had not relayed, then close its run FAILED (``launcher_died``)."""
    from costlab import status
    from costlab.events import FAILURE_TAG

    lost = relay_rest(uri, run_id, run_dir)
    if lost is not None:
        print(f"costlab: some metrics of run {run_id} are only in events.jsonl: {lost}", file=sys.stderr, flush=True)
    store = client(uri)
    store.set_tag(run_id, FAILURE_TAG, "launcher_died")
    store.set_terminated(run_id, status.FAILED)


if __name__ == "__main__":  # rank 0 of a run whose run.py was killed outright: URI RUN_ID RUN_DIR
    close_orphaned(*sys.argv[1:4])
