"""What a search needs from a job, in-process (fast): the value the task returns, run names that tell trials
apart, sweep syntax the preflight accepts, and the corpus digest a run's dataset input carries."""

from __future__ import annotations

import math

import pytest
from mlflow.entities import Metric
from omegaconf import OmegaConf

from costlab import ROOT, data
from costlab.files import corpus_digest, pysource_files
from costlab.launcher import job, objective
from costlab.launcher.preflight import preflight
from costlab.tracking.store import client, experiment_id
from costlab.tracking.sweep import swept_keys
from tests.conftest import compose_config

TAGS = {"model": "gpt_nano", "data": "synthetic", "parallelism": "single", "precision": "fp32", "pruning": "none",
        "quantization": "none", "world_size": "1", "device": "cpu"}


def test_default_run_names_carry_the_overrides_a_sweep_varies():
    overrides = ["trainer.max_steps=4", "trainer.lr=0.0021", "precision=fp32", "+model.dropout=0.1"]
    varied = ["trainer.lr", "precision", "model.dropout"]
    name = job.default_run_name(TAGS, overrides, varied)
    assert name == "gpt_nano single fp32 x1 trainer.lr=0.0021 model.dropout=0.1"
    assert job.default_run_name({**TAGS, "pruning": "wanda"}) == "gpt_nano single fp32 x1 wanda"


def test_the_keys_a_sweep_varies_come_from_the_command_line_and_the_sweeper():
    cfg = OmegaConf.create({"hydra": {
        "overrides": {"task": ["precision=fp32,bf16", "trainer.max_steps=4", "trainer.lr=interval(0.001,0.01)"]},
        "sweeper": {"params": {"pruning.amount": "choice(0.0, 0.5)", "+trainer.seed": "1,2"}},
    }})
    assert swept_keys(cfg) == ["precision", "trainer.lr", "pruning.amount", "trainer.seed"]


@pytest.mark.parametrize("argv", [
    ["-m", "hydra/sweeper=optuna", "trainer.lr=interval(1e-4,1e-2)"],
    ["-m", "precision=choice(fp32,bf16)", "trainer.max_steps=range(2,6)"],
    ['report.baseline="precision=fp32,pruning=none"', "optimized_metric=[eval/loss,model/size_bytes]"],
])
def test_the_preflight_accepts_search_syntax_and_report_keys(argv):
    preflight(argv)


def test_the_preflight_still_refuses_a_missing_key_inside_an_interval(capsys):
    with pytest.raises(SystemExit) as e:
        preflight(["-m", "trainer.lrr=interval(1e-4,1e-2)"])
    assert e.value.code == 2 and "trainer.lrr" in capsys.readouterr().err


def test_the_task_returns_the_optimized_metric_from_mlflow(mlflow_uri, capsys):
    c = client(mlflow_uri)
    run_id = c.create_run(experiment_id(mlflow_uri, "objective")).info.run_id
    c.log_batch(run_id, metrics=[Metric("eval/loss", 1.5, 0, 0), Metric("model/size_bytes", 1e6, 0, 0)])
    cfg = OmegaConf.create({"tracking": {"uri": mlflow_uri}, "optimized_metric": "eval/loss"})
    assert objective.objective(cfg, "FINISHED", run_id) == 1.5
    cfg.optimized_metric = ["eval/loss", "model/size_bytes"]
    assert objective.objective(cfg, "FINISHED", run_id) == [1.5, 1e6]
    # a failed job is the worst trial of the study, whatever the directions, rather than the end of it
    assert objective.objective(cfg, "FAILED", run_id, ["minimize", "maximize"]) == [math.inf, -math.inf]
    cfg.optimized_metric = "infer/ttft_ms"  # not logged
    assert objective.objective(cfg, "FINISHED", run_id) == math.inf
    assert "infer/ttft_ms" in capsys.readouterr().err  # a search is told the trial logged no such metric
    assert objective.objective(cfg, "FINISHED", run_id, warn=False) == math.inf
    assert capsys.readouterr().err == ""  # nothing searches on it (a single run, a grid): no news


def test_a_plan_that_does_not_fit_is_the_worst_trial_of_a_search_however_cheap(mlflow_uri, capsys):
    """An Optuna search over plans minimising their cost must not pick a layout that does not fit in memory."""
    c = client(mlflow_uri)
    cfg = OmegaConf.create({"tracking": {"uri": mlflow_uri}, "optimized_metric": ["plan/usd", "plan/mfu"]})
    for margin, expected in ((-1e9, [math.inf, -math.inf]), (1e9, [20.0, 0.4])):
        run_id = c.create_run(experiment_id(mlflow_uri, "plans")).info.run_id
        c.log_batch(run_id, metrics=[Metric("plan/usd", 20.0, 0, 0), Metric("plan/mfu", 0.4, 0, 0),
                                     Metric("plan/memory_margin_bytes", margin, 0, 0)])
        assert objective.objective(cfg, "FINISHED", run_id, ["minimize", "maximize"]) == expected
        assert ("does not fit" in capsys.readouterr().err) == (margin < 0)


@pytest.mark.parametrize("direction, expected", [
    (None, []), ("maximize", ["maximize"]), (["minimize", "maximize"], ["minimize", "maximize"]),
])
def test_the_search_directions_are_read_whatever_their_form(direction, expected):
    assert objective.directions(OmegaConf.create({"sweeper": {"direction": direction}})) == expected


def test_optunas_default_direction_is_an_enum():
    optuna = pytest.importorskip("hydra_plugins.hydra_optuna_sweeper.config")
    hc = OmegaConf.structured({"sweeper": optuna.OptunaSweeperConf})
    assert objective.directions(hc) == ["Direction.minimize"]
    cfg = OmegaConf.create({"optimized_metric": "eval/loss", "tracking": {"uri": "unused"}})
    assert objective.objective(cfg, "FAILED", None, objective.directions(hc)) == math.inf


def test_the_corpus_digest_follows_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    cfg = {"_target_": "costlab.data.textfile", "name": "textfile", "path": str(tmp_path)}
    source, files = _corpus_files(cfg)
    first = corpus_digest(source, files)
    assert source == str(tmp_path) and [f.name for f in files] == ["a.txt", "b.txt"]
    assert corpus_digest(*_corpus_files(cfg)) == first
    (tmp_path / "b.txt").write_text("world!")
    assert corpus_digest(*_corpus_files(cfg)) != first
    synthetic = compose_config(["data=synthetic"]).data
    a = corpus_digest(*_corpus_files(OmegaConf.to_container(synthetic)))
    b = corpus_digest(*_corpus_files({**OmegaConf.to_container(synthetic), "seed": 7}))
    assert a != b and len(a) == 32


def test_the_digest_reads_the_files_the_pysource_corpus_reads():
    root, files = pysource_files("*.py")
    corpus = data.pysource("*.py")
    assert corpus.train.numel() + corpus.val.numel() == sum(f.stat().st_size for f in files)
    assert corpus.name == f"pysource:{root}/*.py"


def test_the_pareto_search_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[search]'")
    cfg = compose_config(["+experiment=pareto_search"])
    assert list(cfg.optimized_metric) == ["eval/loss", "model/size_bytes"]
    assert cfg.report.baseline == "pruning.amount=0.0,quantization=none,precision=fp32"


def test_the_narrowing_the_pareto_search_preset_documents_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[search]'")
    from hydra import compose, initialize_config_dir

    from costlab import CONF_DIR

    header = (ROOT / "experiments" / "pareto_search.yaml").read_text()
    narrowing = "'hydra.sweeper.params.precision=\"choice(fp32)\"'"
    assert narrowing in header
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=pareto_search", narrowing.strip("'")],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper.params.precision == "choice(fp32)"


def _corpus_files(data):
    from costlab.schema import option

    return option("data", data).corpus_files()
