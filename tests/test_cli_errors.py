"""Bad input is refused by run.py before any worker starts: one line naming the key and value, exit 2."""

import json
import os
import shlex
import subprocess

import pytest

from tests.conftest import TINY, has_cuda, refusal

CASES = {
    "unknown-option": (["parallelism=warp"], "parallelism=warp"),
    "unknown-option-in-sweep": (["-m", "precision=fp32,fp7"], "precision=fp7"),
    "zero-steps": (["trainer.max_steps=0"], "trainer.max_steps=0"),
    "negative-steps": (["trainer.max_steps=-3"], "trainer.max_steps=-3"),
    "fractional-steps": (["trainer.max_steps=2.5"], "trainer.max_steps=2.5"),
    "zero-batch": (["trainer.batch_size=0"], "trainer.batch_size=0"),
    "text-batch": (["trainer.batch_size=many"], "trainer.batch_size=many"),
    "zero-lr": (["trainer.lr=0"], "trainer.lr=0"),
    "negative-lr": (["trainer.lr=-0.001"], "trainer.lr=-0.001"),
    "zero-procs": (["parallelism=ddp", "trainer.nproc_per_node=0"], "trainer.nproc_per_node=0"),
    "single-with-two-procs": (["trainer.nproc_per_node=2"], "trainer.nproc_per_node=2"),
    "heads-not-dividing-width": (["model.n_head=5"], "model.n_head=5"),
    "batch-not-dividing-ranks": (["parallelism=ddp", "trainer.batch_size=9"], "trainer.batch_size=9"),
    "missing-data-path": (["data=textfile", "data.path=/no/such/corpus"], "data.path=/no/such/corpus"),
    # a key the chosen option does not have (wanda ranks per row; only l1/random take a scope)
    "key-of-another-option": (["pruning=wanda", "pruning.scope=global"], "pruning.scope=global: no such key in "
                              "pruning=wanda"),
    "unknown-trainer-key": (["trainer.max_stepz=3"], "trainer.max_stepz=3"),
}


def _assert_refused(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("costlab: error:")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_naming_the_key(name):
    overrides, needle = CASES[name]
    assert needle in str(refusal(*overrides))


@pytest.mark.parametrize("name", ["unknown-option-in-sweep", "batch-not-dividing-ranks"])
def test_bad_input_is_refused_by_run_py_with_one_line(cli, name):
    """The real path, once for the command line's checks and once for validation: exit 2, one line, no run."""
    overrides, needle = CASES[name]
    before = len(cli.runs())
    proc = cli(*overrides, timeout=120)
    _assert_refused(proc, needle)
    assert len(cli.runs()) == before, "no MLflow run may be opened for a refused config"


def test_empty_and_binary_and_empty_folder_data_paths_are_refused(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 100)
    folder = tmp_path / "nothing"
    folder.mkdir()
    for path, why in ((empty, "empty"), (binary, "UTF-8"), (folder, "no files")):
        proc = cli("data=textfile", f"data.path={path}", timeout=120)
        _assert_refused(proc, f"data.path={path}")
        assert why in proc.stderr


@pytest.mark.skipif(has_cuda(), reason="this machine has a GPU")
def test_cuda_device_without_a_gpu_is_refused(cli):
    _assert_refused(cli("trainer.device=cuda", timeout=120), "trainer.device=cuda")


def test_a_tracking_store_that_cannot_be_created_is_refused(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker}/sub/mlflow.db"
    proc = cli(*TINY, f"tracking.uri={uri}", timeout=120)
    _assert_refused(proc, f"tracking.uri={uri}")


def test_a_store_found_broken_while_the_ranks_start_stops_them_and_is_refused(cli, tmp_path):
    """A training job opens the store while torchrun starts; a store that only MLflow can find broken (a file
    that is not a database) stops the ranks, and is refused in one line like any other bad store."""
    broken = tmp_path / "mlflow.db"
    broken.write_bytes(b"this is not an SQLite database" * 100)
    uri = f"sqlite:///{broken}"
    proc = cli(*TINY, f"tracking.uri={uri}", "trainer.max_steps=100000", timeout=180)
    _assert_refused(proc, f"tracking.uri={uri}")
    left = subprocess.run(["pgrep", "-af", f"costlab.training {cli.out}/run/config.yaml"], capture_output=True,
                          text=True).stdout
    assert [line for line in left.splitlines() if "pgrep" not in line] == []
    assert json.loads((cli.out / "run" / "job_status").read_text())["status"] == "FAILED"


def test_a_grid_sweep_with_a_bad_job_is_refused_before_its_first_job_starts(cli):
    proc = cli("-m", *TINY, "trainer.max_steps=2,0", "tracking.experiment_name=bad_grid", timeout=300)
    _assert_refused(proc, "trainer.max_steps=0: 0 is allowed only with trainer.init_from")
    assert "(job 2 of the sweep's 2; none was started)" in proc.stderr
    assert not cli.runs("bad_grid") and not (cli.out / "multirun").exists()  # no parent, no job, no folder


def test_a_grid_sweeps_jobs_are_those_hydras_basic_sweeper_runs():
    from costlab.launcher.preflight import grid_jobs

    jobs = grid_jobs(["-m", "parallelism=single,ddp", "precision=fp32,bf16", "trainer.max_steps=3"])
    assert jobs == [[f"parallelism={p}", f"precision={x}", "trainer.max_steps=3"]
                    for p in ("single", "ddp") for x in ("fp32", "bf16")]
    # a preset's own sweep, narrowed on the command line (the command line's value wins, as in Hydra)
    jobs = grid_jobs(["+experiment=precision_study", "precision=fp32,bf16"])
    assert [j[:2] for j in jobs] == [[f"parallelism={p}", f"precision={x}"] for p in ("single", "ddp")
                                     for x in ("fp32", "bf16")]
    assert all("+experiment=precision_study" in j for j in jobs)
    assert grid_jobs(["parallelism=ddp"]) == [] and grid_jobs(["-m", "parallelism=ddp"]) == [["parallelism=ddp"]]


def test_only_the_presets_set_hydras_keys():
    """A run without -m, a preset or hydra.mode is not composed to ask whether it sweeps (grid_jobs): that holds
    while no other option of any group sets Hydra's keys (hydra.mode among them)."""
    import re

    from costlab import CONF_DIR

    options = [f for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "experiment" for f in d.rglob("*.yaml")]
    assert len(options) > 40
    assert not [str(f) for f in options if re.search(r"^hydra\s*:", f.read_text(), re.M)]


@pytest.mark.parametrize("choice", ["hydra/sweeper=optuna", "hydra/launcher=submitit_slurm"])
def test_a_search_or_a_launcher_that_runs_jobs_elsewhere_is_not_checked_ahead(choice):
    """Optuna proposes its trials as it goes (a refused trial fails and the search goes on); submitit runs each
    job on a node this process cannot check for it (its device, its memory)."""
    from costlab.launcher.preflight import grid_jobs

    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper" if "optuna" in choice else
                        "hydra_plugins.hydra_submitit_launcher")
    assert grid_jobs(["-m", choice, "precision=fp32,bf16"]) == []


def test_a_sweep_with_an_unusable_store_is_refused_before_any_job(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{blocker}/mlflow.db"
    proc = cli("-m", *TINY, "precision=fp32,bf16", f"tracking.uri={uri}", timeout=120)
    _assert_refused(proc, f"tracking.uri={uri}")


@pytest.mark.e2e
def test_textfile_without_a_path_is_refused_with_one_line(cli):
    proc = cli("data=textfile", timeout=120)
    _assert_refused(proc, "data.path=???: required: data=textfile reads data.path=")


@pytest.mark.parametrize("kind", ["character device", "FIFO"])
def test_a_data_path_that_is_neither_file_nor_folder_says_what_it_is(tmp_path, kind):
    from costlab.launcher.validate import validate
    from costlab.schema import ConfigError
    from tests.conftest import compose_config

    path = "/dev/zero"
    if kind == "FIFO":
        path = str(tmp_path / "pipe")
        os.mkfifo(path)
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["data=textfile", f"data.path={path}"]))
    assert e.value.key == "data.path" and e.value.value == path
    assert kind in e.value.why and "no files" not in e.value.why


def test_an_unparsable_override_is_named_alone_with_a_hint_hydra_accepts(capsys):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from costlab.launcher.preflight import preflight

    bad = "data.path=/tmp/données"
    with pytest.raises(SystemExit) as e:
        preflight(["model=gpt_nano", bad, "trainer.max_steps=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"costlab: error: {bad}: Hydra cannot parse this value; quote it: ")
    assert "model=gpt_nano" not in err and "\n" not in err
    hint = shlex.split(err.rpartition("quote it: ")[2])[0]
    assert OverridesParser.create().parse_overrides([hint])[0].value() == "/tmp/données"


def test_spaces_and_non_ascii_paths_reach_validation(tmp_path):
    from costlab.launcher.preflight import preflight
    from costlab.launcher.validate import validate
    from tests.conftest import compose_config

    folder = tmp_path / "mes données" / "é t é"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("déjà vu " * 200, encoding="utf-8")
    for override in (f'data.path="{folder}"', f"data.path='{folder}'"):
        preflight(["data=textfile", override])  # accepted: no SystemExit
        cfg = compose_config(["data=textfile", override])
        assert cfg.data.path == str(folder)
        validate(cfg)
    spaces_only = tmp_path / "my texts"
    spaces_only.mkdir()
    (spaces_only / "a.txt").write_text("plain text " * 200)
    validate(compose_config(["data=textfile", f"data.path={spaces_only}"]))  # Hydra takes spaces unquoted


@pytest.mark.parametrize("override", ["hydra/sweeper=nonexistent", "hydra.launcher.n_jobz=3"])
def test_an_override_of_hydras_own_that_it_cannot_apply_is_refused_in_one_line(override, capsys):
    from costlab.launcher.job import check_job
    from costlab.launcher.preflight import preflight

    with pytest.raises(SystemExit) as e:
        preflight(["-m", override, "precision=fp32,bf16"], check_job=check_job)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith(f"costlab: error: override={override}: "), err


def test_an_interval_in_a_grid_sweep_is_refused_in_one_line(capsys):
    from costlab.launcher.job import check_job
    from costlab.launcher.preflight import preflight

    with pytest.raises(SystemExit) as e:
        preflight(["-m", "trainer.lr=interval(1e-4,1e-2)"], check_job=check_job)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert err.startswith("costlab: error: trainer.lr=interval(1e-4,1e-2): a grid sweep") and "optuna" in err, err
