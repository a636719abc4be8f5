"""The MLflow ``pyfunc`` model of a run's final model, as MLflow's "models from code" wants it: MLflow copies
this file into the model and runs it to load the model (:mod:`costlab.report.deploy` logs it). Not imported by
costlab itself."""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class CostlabModel(mlflow.pyfunc.PythonModel):
    """The run's ``model.pt`` loaded by :func:`costlab.use.load_run` (the same model on the same tokenizer);
    ``predict``: the greedy continuations of a ``prompt`` column (``params``: ``max_new_tokens``, ``temperature``)."""

    def load_context(self, context):  # noqa: ANN001, ANN201  (MLflow reads predict's hints; these stay plain)
        from costlab.use import load_run

        self.loaded = load_run(context.artifacts["run"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from costlab.use import generate

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        params = params or {}
        return [generate(self.loaded, str(p), int(params.get("max_new_tokens", 32)),
                         float(params.get("temperature", 0.0))) for p in prompts]


set_model(CostlabModel())
