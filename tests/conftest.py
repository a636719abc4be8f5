"""Shared fixtures: a real SQLite MLflow store per test session, and ``python run.py`` as a user runs it."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

import costlab  # noqa: F401  (registers the ${costlab.root:} resolver)
from costlab import ROOT
from costlab.launcher import preflight

# A model and data small enough that a run.py job costs a few seconds on 2 cores.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "data=synthetic",
    "data.n_bytes=20000",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.eval_interval=0",
    "trainer.eval_batches=2",
    "trainer.eval_batch_size=8",
    "trainer.infer_iters=2",
    "trainer.gen_prompt_len=8",  # prompt + generated tokens must fit model.block_size
    "trainer.gen_tokens=4",
    "trainer.gen_iters=2",
    "trainer.timing_warmup_steps=1",
    "serve.max_concurrency=2",  # the serving ladder: rungs 1 and 2 of short requests
    "serve.requests=4",
    "serve.prompt_len=[4,8]",
    "serve.output_len=[2,4]",
    "tracking.log_model=false",  # the MLflow model's tests ask for it (tests/test_use.py)
    "tracking.system_metrics_s=0",  # likewise MLflow's system metrics
]

# a Hugging Face Llama of TINY's size, from the llama_tiny config
HF_TINY = [*(o for o in TINY if not o.startswith("model.")), "model=hf", "model.config=llama_tiny",
           "model.block_size=32"]


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return preflight.compose_config(list(overrides))


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """conf/ composed as run.py composes it (``costlab.launcher.preflight.compose_config``), once per list of
    overrides in a session: Hydra reads every group's YAML again for each composition (~0.1 s on 2 cores), and
    the tests compose the same lists hundreds of times. Each call returns its own copy to change."""
    return copy.deepcopy(_composed(tuple(overrides or ())))


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real SQLite store for the session (creating its schema takes seconds, so it is shared)."""
    from costlab.tracking.store import experiment_id

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    experiment_id(uri, "costlab")
    return uri


class Cli:
    """Runs ``python run.py ...`` in a subprocess with the test's store and output folder."""

    def __init__(self, uri: str, out: Path):
        self.uri, self.out = uri, out

    def __call__(
        self, *overrides: str, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        defaults = {
            "tracking.uri": self.uri,
            "hydra.run.dir": f"{self.out}/run",
            "hydra.sweep.dir": f"{self.out}/multirun",
        }
        given = {o.split("=", 1)[0] for o in overrides}
        args = [sys.executable, str(ROOT / "run.py"), *overrides]
        args += [f"{k}={v}" for k, v in defaults.items() if k not in given]
        return subprocess.run(
            args, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self, experiment: str = "costlab", filter_string: str = "") -> list:
        c = self.client()
        exp = c.get_experiment_by_name(experiment)
        return c.search_runs([exp.experiment_id], filter_string) if exp else []

    def run_by_name(self, name: str, experiment: str = "costlab"):
        found = self.runs(experiment, f"tags.mlflow.runName = '{name}'")
        assert len(found) == 1, f"expected one run named {name}, found {len(found)}"
        return found[0]

    def loss_curve(self, run_id: str, key: str = "train/loss") -> list[float]:
        history = self.client().get_metric_history(run_id, key)
        return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.fixture
def cli(mlflow_uri: str, tmp_path: Path) -> Cli:
    return Cli(mlflow_uri, tmp_path)


def assert_activations_predicted(metrics: dict[str, float], rel: float = 0.001) -> None:
    """A run measured the activation bytes its ranks held for backward (saved-tensor counting in its first
    step), and the memory model predicted them within ``rel``: within 40 bytes over every parallelism option,
    checkpointing mode, precision and model family of ``benchmarks/predictions.py``."""
    measured, predicted = metrics["mem/activations_bytes_per_rank"], metrics["mem/predicted_activations_bytes_per_rank"]
    assert measured > 0 and abs(predicted / measured - 1) <= rel, (predicted, measured)


def spawn_ranks(fn, world: int, folder: Path, seconds: float, what: str) -> None:
    """``fn(rank, world, str(folder))`` on ``world`` spawned processes; fails the test, the processes stopped, if
    they have not all returned within ``seconds`` (a rank waiting in a collective its peer never joins)."""
    import time

    import torch.multiprocessing as mp

    ranks = mp.spawn(fn, args=(world, str(folder)), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.terminate()
            pytest.fail(f"the ranks {what} hung")


def split_against_whole(whole: Any, mesh: Any, x: Any) -> tuple[Any, float, dict[str, float]]:
    """``whole`` copied and split by tensor parallel over ``mesh`` (as a run splits it); ``x`` through both and a
    backward of each: the split copy, the largest difference of the logits, and of each weight's gradient by name."""
    from torch.distributed.tensor import DTensor

    from costlab.parallelism.tp import apply_tp

    split = copy.deepcopy(whole)
    apply_tp(split, mesh)
    logits = [model(x) for model in (whole, split)]
    for value in logits:
        value.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in whole.named_parameters()}
    diffs = {n: ((p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) - grads[n]).abs().max().item()
             for n, p in split.named_parameters()}
    return split, (logits[1] - logits[0]).abs().max().item(), diffs


def has_cuda() -> bool:
    from costlab.measure.machine import visible_gpus

    return bool(visible_gpus())


requires_cuda = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")


def refusal(*overrides: str):
    """The error ``run.py`` refuses these overrides with before any rank starts, found in-process: the
    command line's checks, the composed config's schema, the device and hardware, validation and resources
    (``costlab.launcher.job.check_job``). One subprocess per refusal path checks the real exit; the cases
    are cheap here."""
    from costlab.launcher.job import check_job
    from costlab.launcher.preflight import check_group_choices, check_keys
    from costlab.schema import ConfigError

    argv = [o for o in overrides if o != "-m"]
    with pytest.raises(ConfigError) as e:
        check_group_choices(argv)
        check_keys(argv)
        cfg = compose_config(argv)
        check_job(cfg, cfg.mode == "plan")
    return e.value
