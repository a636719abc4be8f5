"""Every option of every config group composes, and validates on this machine or is refused in one line."""

import os

import pytest
from omegaconf import open_dict

from costlab import CONF_DIR, ROOT
from costlab.launcher import preflight
from costlab.launcher.preflight import options
from costlab.launcher.validate import validate
from costlab.measure.machine import resolve_device
from costlab.schema import ConfigError
from tests.conftest import compose_config

GROUPS = ["model", "data", "parallelism", "precision", "pruning", "quantization"]
DEFAULTS = {"model": "gpt_nano", "data": "pysource", "parallelism": "single", "precision": "fp32",
            "pruning": "none", "quantization": "none"}
# options that only make sense with a value the user must give
REQUIRED = {("data", "textfile"): [f"data.path={ROOT / 'pyproject.toml'}"]}
ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


def test_groups_have_the_contract_defaults():
    cfg = compose_config()
    for group, option in DEFAULTS.items():
        assert cfg[group].name == option


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_validates_or_is_refused_in_one_line(group, option):
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert cfg[group].name == option
    with open_dict(cfg):
        cfg.trainer.device = resolve_device("auto")
    try:
        validate(cfg)
    except ConfigError as e:  # only for a technique this machine cannot run
        message = str(e)
        assert "\n" not in message and "=" in message
        assert any(word in message for word in ("GPU", "CUDA", "rank", "process")), message


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
def test_presets_compose_as_sweeps(preset):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params, "a preset sets up its own sweep"
    assert cfg.tracking.experiment_name == preset


def test_tracking_store_is_under_the_project_root_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = preflight.compose_config()  # composed here, in this folder (the tests' copy may come from another)
    assert cfg.tracking.uri == f"sqlite:///{ROOT}/outputs/mlflow.db"
    assert os.path.isabs(cfg.tracking.uri[len("sqlite:///"):])


def test_every_config_file_names_itself():
    for group in GROUPS:
        for option in options(group):
            text = (CONF_DIR / group / f"{option}.yaml").read_text()
            assert f"name: {option}" in text, f"conf/{group}/{option}.yaml"


@pytest.mark.parametrize("extra", [[], ["pruning=structured", "quantization=int8_dynamic"], ["parallelism=fsdp_tp"]])
def test_validating_a_config_never_initialises_cuda(extra):
    """The launcher may import torch (shapes come from the meta device) but must never create a CUDA
    context: that belongs to the workers, one per GPU."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from omegaconf import open_dict\n"
        "import costlab.launcher.job\n"
        "from costlab.launcher.preflight import compose_config\n"
        "from costlab.launcher.validate import validate\n"
        "from costlab.measure.machine import resolve_device\n"
        f"cfg = compose_config(['data=textfile', 'data.path={ROOT / 'pyproject.toml'}', *{extra!r}])\n"
        "with open_dict(cfg):\n"
        "    cfg.trainer.device = resolve_device('auto')\n"
        "validate(cfg)\n"
        "torch = sys.modules.get('torch')\n"
        "print('torch imported:', torch is not None)\n"
        "print('dynamo imported:', 'torch._dynamo' in sys.modules)\n"
        "print('cuda initialised:', torch is not None and torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "cuda initialised: False"
    # the shapes come from a model built on the meta device without its weights' fills, whose meta kernels
    # would import torch._dynamo (~2 s of a start)
    assert out.strip().splitlines()[-2] == "dynamo imported: False"
    # a config whose checks need no shapes does not even pay for importing torch: sweeps start fast
    assert out.strip().splitlines()[0] == f"torch imported: {bool(extra)}"


def test_a_generation_longer_than_the_model_positions_is_cut_down_to_fit():
    from costlab.measure.generation import generation_lengths

    assert generation_lengths(compose_config(["trainer.gen_prompt_len=112", "trainer.gen_tokens=16"])) == (112, 16)
    assert generation_lengths(compose_config(["trainer.gen_prompt_len=120", "trainer.gen_tokens=16"])) == (112, 16)
    assert generation_lengths(compose_config(["model.block_size=16", "trainer.gen_prompt_len=32",
                                              "trainer.gen_tokens=16"])) == (8, 8)
    with pytest.raises(ConfigError, match="trainer.gen_tokens=1: must be at least 2"):
        validate(compose_config(["trainer.gen_tokens=1"]))
