"""Finding a run: by its folder or its MLflow run id, for ``trainer.resume``, ``trainer.init_from`` and
``costlab.use``. No torch: it runs in the launcher."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from costlab.models.saved import FINAL, RUN_ID, UNCOMPRESSED, trained_model_file
from costlab.tracking.store import client

if TYPE_CHECKING:
    from mlflow.entities import Run

RUN_DIR_TAG = "costlab.run_dir"  # where a run's folder (config, log, checkpoints) is: what trainer.resume finds


def get_run(uri: str, run_id: str) -> Run | None:
    """The MLflow run ``run_id`` in the store ``uri``, or None when the store says it has no such run. Any
    other failure (a locked, broken or unreachable store) is raised as it is: it is not "no such run"."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def find_run(value: str, uri: str) -> tuple[Path, str | None]:
    """The folder and the MLflow run id of the run ``value`` names: a run folder (it holds the ``config.yaml``
    the launcher writes; the id is the one in it, None for a run that was not tracked) or an MLflow run id in
    the store ``uri`` (the folder is the run's :data:`RUN_DIR_TAG`). Raises ``ValueError``: why, in a few
    words (the caller names the key or argument). No torch."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ValueError("the folder holds no config.yaml: it is not a run folder")
        run_id = (OmegaConf.load(path / "config.yaml").get("runtime") or {}).get("run_id")
        return path.resolve(), None if run_id is None else str(run_id)
    if not RUN_ID.match(value):
        raise ValueError("no such run folder, and not an MLflow run id")
    run = get_run(uri, value)
    if run is None:
        raise ValueError(f"no such folder, and no MLflow run with this id in {uri}")
    tags = run.data.tags
    if RUN_DIR_TAG not in tags:
        raise ValueError(f"this run does not say where its folder is (it has no {RUN_DIR_TAG} tag: it is older)")
    return Path(tags[RUN_DIR_TAG]), value


def resolve_init_from(value: Any, tracking_uri: str) -> Path:
    """The model file ``trainer.init_from`` names: a checkpoint file, a folder holding one (a run folder's
    trained, uncompressed model), or an MLflow run id in ``tracking_uri`` (found as :func:`find_run` finds
    any run: through its folder). Raises ``ValueError``: why, in a few words."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if not path.is_dir() and not RUN_ID.match(text):
        raise ValueError("no such file or folder, and not an MLflow run id")
    folder = path if path.is_dir() else find_run(text, tracking_uri)[0]
    found = trained_model_file(folder)
    if found is None:
        where = "the folder" if path.is_dir() else f"MLflow run {text}'s folder, {folder},"
        raise ValueError(f"{where} holds neither {UNCOMPRESSED} nor {FINAL}")
    return found
