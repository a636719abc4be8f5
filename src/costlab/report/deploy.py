"""The shipped model where deployment tools find it: a run's final model as an MLflow model
(``runs:/<run id>/model``: ``mlflow models serve``, ``mlflow.pyfunc.load_model`` in a fresh process), and a
sweep's Pareto-front models in the MLflow model registry.

**The MLflow model** is a ``pyfunc`` whose artifacts are the run's ``config.yaml`` and ``model.pt`` (the model as
shipped, compressed if the run compressed) and whose code is the ``costlab`` package with its ``conf/`` folder
(``code_paths``); its class, :mod:`costlab.report.pyfunc`, is logged as code (MLflow's models from code) and
loads with :func:`costlab.use.load_run`, so it is the same model ``costlab.use`` loads, on the same tokenizer.
``predict`` takes prompts (a column ``prompt``) and returns their greedy continuations; ``params``:
``max_new_tokens`` (32), ``temperature`` (0: greedy). The signature and the input example are written out, not
inferred, so logging loads no torch in the launcher, which logs it once the ranks have saved the model
(``tracking.log_model``).

**The registry.** Every finished run of a sweep's report on a Pareto front (quality against any of the report's
costs) whose final model was logged as an MLflow model becomes a version of the registered model named after
the sweep's MLflow experiment, tagged with its label and the fronts it is on. A run already registered under
that name is not registered again (a report rebuilt from MLflow adds nothing).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from costlab.measure.names import EVAL_LOSS
from costlab.report.table import Report, RunRecord, pareto_front

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from omegaconf import DictConfig

MODEL_ARTIFACT = "model"  # runs:/<run id>/model
MODEL_TAG = "costlab.mlflow_model"  # the model's URI, or why none was logged
EXAMPLE_PROMPT = "def main("


def _requirements(cfg: DictConfig) -> list[str]:
    """What a fresh environment needs to load this run's model (the package's own floors)."""
    needs = ["torch>=2.6", "hydra-core>=1.3", "omegaconf>=2.3", "mlflow>=3.0"]
    if str(cfg.model.get("_target_", "")).startswith("costlab.models.hf"):
        needs.append("transformers>=4.56")
    if str(cfg.quantization.get("name", "none")) != "none" or str(cfg.get("finetune", {}).get("name")) == "qlora":
        needs.append("torchao>=0.10")
    return needs


def save_pyfunc(run_dir: Path, cfg: DictConfig, out: Path) -> Path:
    """The run's final model written as an MLflow ``pyfunc`` model folder under ``out``."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import costlab

    files = out / "run"
    files.mkdir(parents=True)
    for name in ("config.yaml", "model.pt"):
        shutil.copy2(run_dir / name, files / name)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 32), ParamSpec("temperature", "double", 0.0)]),
    )
    path = out / MODEL_ARTIFACT
    quiet = logging.getLogger("mlflow")
    level, quiet.level = quiet.level, logging.WARNING  # MLflow's notes on validating the example, not ours to print
    try:
        with warnings.catch_warnings():  # restores showwarning: MLflow's own filters show its notes "once"
            shown = warnings.showwarning

            def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
                if "type hints to the `predict` method" not in str(message):  # the signature is given
                    shown(message, *args, **kwargs)

            warnings.showwarning = show
            mlflow.pyfunc.save_model(
                path=str(path), python_model=str(Path(__file__).with_name("pyfunc.py")),
                artifacts={"run": str(files)}, code_paths=[str(Path(costlab.__file__).parent)], signature=signature,
                input_example=pd.DataFrame({"prompt": [EXAMPLE_PROMPT]}), pip_requirements=_requirements(cfg),
            )
    finally:
        quiet.level = level
    # costlab finds its config root two folders above its package: the model's folder (code/costlab/..)
    shutil.copytree(costlab.CONF_DIR, path / "conf")
    return path


def log_final_model(c: MlflowClient, run_id: str, run_dir: Path, cfg: DictConfig) -> str:
    """Log the run's ``model.pt`` as the MLflow model ``runs:/<run id>/model``; returns its URI, or why not."""
    if not (run_dir / "model.pt").exists():
        return "not logged: the run saved no model.pt"
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars on the console
    with tempfile.TemporaryDirectory() as tmp:
        path = save_pyfunc(run_dir, cfg, Path(tmp))
        c.log_artifacts(run_id, str(path), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


REGISTERED_TAG = "costlab.registered"  # on the sweep's parent: "<name> v<version> (<label>)", one per model


def front_runs(rep: Report, fronts: dict[str, tuple[str, bool]]) -> dict[str, list[str]]:
    """Run id -> the fronts (``fronts``: name -> (cost metric, bigger is better)) it is on, quality being
    :data:`EVAL_LOSS`."""
    on: dict[str, list[str]] = {}
    for name, (metric, bigger) in fronts.items():
        runs = [r for r in rep.rows if r.finished and r.get(metric) is not None and r.get(EVAL_LOSS) is not None]
        points = [(r.get(metric), r.get(EVAL_LOSS)) for r in runs]
        for i in pareto_front(points, bigger) if runs else []:
            on.setdefault(runs[i].run_id, []).append(name)
    return on


def register_front(c: MlflowClient, rep: Report, parent_id: str, fronts: dict[str, tuple[str, bool]]) -> list[str]:
    """Register the front's logged models (see the module's notes); returns what was registered, as tagged."""
    from mlflow.exceptions import MlflowException

    parent = c.get_run(parent_id)
    name = c.get_experiment(parent.info.experiment_id).name
    by_id: dict[str, RunRecord] = {r.run_id: r for r in rep.rows}
    said = []
    for run_id, on in front_runs(rep, fronts).items():
        run = c.get_run(run_id)
        if not run.data.tags.get(MODEL_TAG, "").startswith("runs:/"):
            continue  # no MLflow model was logged for it
        try:
            c.get_registered_model(name)
        except MlflowException:
            c.create_registered_model(name, description="costlab: the Pareto-front models of this experiment's sweeps")
        if c.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            continue
        label = by_id[run_id].label
        version = c.create_model_version(name, f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id,
                                         tags={"label": label, "pareto": ",".join(on), "sweep": parent_id})
        said.append(f"{name} v{version.version} ({label})")
    if said:
        c.set_tag(parent_id, REGISTERED_TAG, "; ".join(said)[:5000])
    return said
