"""How a job ended, written into its own folder, and how a sweep ended, read back from those records.

Under Hydra's joblib or submitit launchers the jobs run in other processes, or on other machines, so
nothing in ``run.py``'s memory knows how they ended. Each job therefore records its status beside its
outputs: ``job_status`` for node 0, ``job_status.node<N>`` for a follower node of a multi-node job
(which opens no MLflow run, so this file is its only report). A job writes ``RUNNING`` when it starts
and its final status when it ends, so a job killed outright leaves ``RUNNING`` behind and still counts
as failed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from costlab.files import write_whole
from costlab.schema import ConfigError

STATUS_FILE = "job_status"
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
EXIT_REFUSED = 2  # a config refused before any worker started
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


@dataclass(frozen=True)
class JobRecord:
    path: Path
    status: str
    node_rank: int
    run_id: str | None
    parent_run_id: str | None


def status_path(job_dir: Path, node_rank: int) -> Path:
    return job_dir / (STATUS_FILE if node_rank == 0 else f"{STATUS_FILE}.node{node_rank}")


def write(
    job_dir: Path, status: str, *, node_rank: int, run_id: str | None = None, parent_run_id: str | None = None
) -> Path:
    """Record ``status`` for this node of the job; the file is replaced whole, so a reader never sees half."""
    path = status_path(job_dir, node_rank)
    record = {"status": status, "node_rank": node_rank, "run_id": run_id, "parent_run_id": parent_run_id}
    write_whole(path, json.dumps(record) + "\n")
    return path


def read(path: Path) -> JobRecord | None:
    """The record as written, or None for a file that is not one (writes are whole, so not a torn one)."""
    try:
        data = json.loads(path.read_text())
        return JobRecord(path, str(data["status"]), int(data["node_rank"]), data["run_id"], data["parent_run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_id_of(job_dir: Path, wait_s: float = 0.0) -> str | None:
    """The MLflow run id node 0's ``run.py`` recorded for the job in ``job_dir``, waiting up to ``wait_s`` for
    it: a fresh run is opened while the ranks start, and its id recorded as soon as it exists."""
    deadline = time.monotonic() + wait_s
    while True:
        record = read(status_path(job_dir, 0))
        if record is not None and record.run_id:
            return record.run_id
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def sweep_records(sweep_dir: Path, parent_run_id: str) -> list[JobRecord]:
    """Every node's record of every job of this sweep, wherever the sweep's ``subdir`` put the job folders.

    Records of another sweep that used the same folder carry another parent id and are left out.
    """
    paths = [p for p in sorted(sweep_dir.rglob(f"{STATUS_FILE}*")) if p.is_file() and not p.name.startswith(".")]
    return [r for r in map(read, paths) if r is not None and r.parent_run_id == parent_run_id]


def job_records(job_dir: Path) -> list[JobRecord]:
    """Every node's record of the job in ``job_dir``."""
    paths = sorted(p for p in job_dir.glob(f"{STATUS_FILE}*") if p.is_file() and not p.name.startswith("."))
    return [r for r in map(read, paths) if r is not None]


_SEVERITY = {FINISHED: 0, FAILED: 1, KILLED: 2}


def worst(statuses: Iterable[str]) -> str:
    """KILLED if any job was interrupted, else FAILED if any did not finish (still RUNNING included)."""
    return max((s if s in _SEVERITY else FAILED for s in statuses), key=_SEVERITY.__getitem__, default=FINISHED)


def exit_code(status: str) -> int:
    return {FINISHED: 0, KILLED: EXIT_INTERRUPTED}.get(status, 1)


def refuse(error: ConfigError) -> NoReturn:
    """One line naming the key, the value and why; exit 2."""
    print(f"costlab: error: {error}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)
