"""Everything MLflow, on the launcher's side: the store, the runs a job owns, the relay of what rank 0
records, a sweep's parent run, and finding a run. The ranks never import this package.

Imports no MLflow at module level: it is slow to import, and only a job that uses a store pays for it.
"""

from costlab.tracking.find import RUN_DIR_TAG, find_run, get_run, resolve_init_from
from costlab.tracking.relay import Relay, relay_rest
from costlab.tracking.runs import (
    CONTRACT_TAGS,
    ERROR_TAG,
    OWNER_TAG,
    SWEEP_ID_TAG,
    SWEEP_NAME_TAG,
    check_tracking,
    close_abandoned,
    close_orphans,
    create_run,
    flatten,
    metrics_at,
    open_run,
    reopen_run,
    system_metrics,
)
from costlab.tracking.store import client, default_uri, experiment_id, pages, prepare_store, sqlite_path
from costlab.tracking.sweep import (
    PARENT_ID_FILE,
    ROLE_TAG,
    SWEEP_DIR_TAG,
    SWEEP_ROLE,
    SWEPT_TAG,
    SweepParentRun,
    child_runs,
    parent_run_id,
    sweep_info,
    sweep_outcome,
    swept_keys,
)

__all__ = [
    "CONTRACT_TAGS", "ERROR_TAG", "OWNER_TAG", "PARENT_ID_FILE", "ROLE_TAG", "RUN_DIR_TAG", "SWEEP_DIR_TAG",
    "SWEEP_ID_TAG", "SWEEP_NAME_TAG", "SWEEP_ROLE", "SWEPT_TAG", "Relay", "SweepParentRun", "check_tracking",
    "child_runs", "client", "close_abandoned", "close_orphans", "create_run", "default_uri", "experiment_id",
    "find_run", "flatten", "get_run", "metrics_at", "open_run", "pages", "parent_run_id", "prepare_store", "relay_rest",
    "reopen_run", "resolve_init_from", "sqlite_path", "sweep_info", "sweep_outcome", "swept_keys", "system_metrics",
]
