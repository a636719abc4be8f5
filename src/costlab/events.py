"""What rank 0 records for its MLflow run, written as JSON lines into the run folder (``events.jsonl``).

The launcher (``run.py``) owns the run, already has the store open and otherwise only waits on torchrun:
it relays these lines into MLflow as they arrive (:class:`costlab.tracking.relay.Relay`). A worker therefore
never imports MLflow nor opens the store, which cost every job ~4.5 s of start-up on a 2-core CPU, and
the training loop only ever appends to a local file.

Lines: ``{"start": 1}`` when a worker attempt starts (a restarted or resumed attempt re-runs some steps,
which the relay then logs once); ``{"m": [[key, value, timestamp_ms, step], ...]}``; ``{"t": {tag: value}}``.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

FAILURE_TAG = "costlab.failure"  # why a run failed, where it is known: oom, launcher_died

EVENTS_FILE = "events.jsonl"


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS_FILE


def append(run_dir: str | Path, *events: dict) -> None:
    """Append ``events`` as whole lines in one ``write`` (a reader never sees half a line from it)."""
    data = "".join(json.dumps(e) + "\n" for e in events).encode()
    fd = os.open(events_path(run_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def record_tags(run_dir: str | Path, tags: dict[str, str]) -> None:
    """Tags for the run (from any rank of node 0: one short line per call)."""
    append(run_dir, {"t": {str(k): str(v) for k, v in tags.items()}})


class MetricLogger:
    """Buffers ``(key, value, step)`` in memory and appends them to the run's events file from a background
    thread, so the training loop never waits on a disk, let alone on the store."""

    def __init__(self, run_dir: str | Path, flush_every_s: float = 1.0):
        self._run_dir = Path(run_dir)
        self._queue: queue.Queue = queue.Queue()
        self._flush_every_s = flush_every_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one drain at a time: lines keep their order
        self._error: BaseException | None = None
        self.time_spent_s = 0.0  # time the caller spent in log(): what logging costs the hot path
        append(self._run_dir, {"start": 1})
        self._thread = threading.Thread(target=self._loop, name="costlab-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        t0 = time.perf_counter()
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            self._queue.put([key, float(value), ts, step])
        self.time_spent_s += time.perf_counter() - t0

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags, after every metric logged before them."""
        self.flush()
        record_tags(self._run_dir, tags)

    def flush(self) -> None:
        """Write what is buffered now (from any thread)."""
        with self._lock:
            batch = []
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch:
                append(self._run_dir, {"m": batch})

    def _loop(self) -> None:
        while not self._stop.wait(self._flush_every_s):
            try:
                self.flush()
            except Exception as e:  # surface on close(), never kill training for a logging hiccup
                self._error = e

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()
        if self._error is not None:
            raise RuntimeError(f"metric logging failed: {self._error}") from self._error
