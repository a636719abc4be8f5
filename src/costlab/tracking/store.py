"""The MLflow store: a client that waits out a locked SQLite file, a new store created whole, experiments."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from omegaconf import OmegaConf

from costlab import faults

if TYPE_CHECKING:  # mlflow is imported only when a store is used: it is slow to import
    from mlflow.tracking import MlflowClient


LOCKED_RETRY_S = 60.0  # how long a write waits out "database is locked" (SQLite, several writers)


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
                    with faults.shielded():  # a Ctrl-C waits for the call: cut in half, it can keep SQLite locked
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
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=artifacts)
    except MlflowException as e:  # another process created it first; anything else is the store's to say
        exp = c.get_experiment_by_name(name) if e.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if exp is None:
            raise
        return exp.experiment_id


def pages(search: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Every result of an MLflow search (``search_runs``, ``search_experiments``), page after page."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return
