"""Compression through ``python run.py`` as a user runs it: bad input refused before any worker starts
(exit 2, one line naming the key), a pruned + quantized run logged with every contract metric, and a
saved model compressed again through ``trainer.init_from`` without retraining."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from costlab import CONF_DIR
from costlab.launcher.validate import validate
from costlab.models.gpt import GPT
from costlab.schema import ConfigError
from tests.conftest import TINY, compose_config, refusal

COMPRESSION_METRICS = (
    "eval/loss", "eval/loss_uncompressed", "eval/loss_delta", "model/params", "model/nonzero_params",
    "model/sparsity", "model/size_bytes", "model/size_bytes_uncompressed", "model/size_bytes_sparse",
    "infer/tokens_per_s", "infer/latency_ms_p50", "infer/speedup",
)


def refused(cli, *overrides: str) -> str:
    proc = cli(*TINY, *overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("costlab: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert not (cli.out / "run" / "worker.log").exists()  # torchrun never started
    return lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["pruning=l1_unstructured", "pruning.amount=1.0"], "pruning.amount=1.0"),
        (["pruning=wanda", "pruning.amount=-0.1"], "pruning.amount=-0.1"),
        (["pruning=l1_unstructured", "pruning.targets=[lm_heads]"], "pruning.targets="),
        (["quantization=int4_weight_only"], "quantization=int4_weight_only"),
        (["quantization=fp8"], "quantization=fp8"),
        (["pruning=semi_structured"], "pruning=semi_structured"),
        (["pruning=wanda", "pruning.calibration_batches=0"], "pruning.calibration_batches=0"),
        (["trainer.init_from=/no/such/model.pt"], "trainer.init_from=/no/such/model.pt"),
        (["trainer.init_from=0123456789abcdef0123456789abcdef"], "trainer.init_from=0123456789abcdef"),
        (["trainer.max_steps=0"], "trainer.max_steps=0"),
    ],
)
def test_bad_compression_input_is_refused_naming_the_key(tmp_path, overrides, key):
    store = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"  # where a run id is looked up
    assert key in str(refusal(*TINY, "trainer.device=cpu", store, *overrides))


@pytest.mark.e2e
def test_a_compression_refusal_stops_run_py_before_torchrun(cli):
    assert "pruning.amount=1.0" in refused(cli, "trainer.device=cpu", "pruning=l1_unstructured", "pruning.amount=1.0")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["quantization=int8_dynamic", "quantization.targets=nope.*"], "quantization.targets"),
        (["quantization=qat_int8", "quantization.qat_steps=99"], "quantization.qat_steps"),
        (["quantization=qat_int8", "quantization.qat_steps=2", "parallelism=fsdp", "trainer.nproc_per_node=2"],
         "quantization"),
        # ln_structured ranks rows per layer and structured prunes after training: neither option has the key
        (["pruning=ln_structured", "+pruning.scope=global"], "pruning.scope"),
        (["pruning=structured", "+pruning.schedule=gradual"], "pruning.schedule"),
        (["pruning=l1_unstructured", "pruning.scope=everywhere"], "pruning.scope"),
        (["pruning=random_unstructured", "pruning.schedule=sometimes"], "pruning.schedule"),
        (["pruning=l1_unstructured", "pruning.schedule=gradual", "pruning.end_step=99"], "pruning.end_step"),
        (["pruning=structured", "pruning.parts=[ffn]"], "pruning.parts"),
        (["pruning=semi_structured", "pruning.amount=0.3", "pruning.allow_mask_only=true"], "pruning.amount"),
        (["pruning=l1_unstructured", "pruning.recovery_steps=-1"], "pruning.recovery_steps"),
    ],
)
def test_more_bad_compression_input_in_process(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_config([*TINY, "trainer.device=cpu", *overrides]))
    assert e.value.key == key


@pytest.mark.parametrize(
    "overrides",
    [["pruning=ln_structured", "pruning.scope=global"], ["pruning=structured", "pruning.schedule=gradual"],
     ["pruning=wanda", "pruning.scope=local"], ["quantization=int8_dynamic", "quantization.qat_steps=2"]],
)
def test_a_key_the_option_does_not_have_is_refused_when_composing(overrides):
    with pytest.raises(ConfigCompositionException, match=overrides[1].split("=")[0]):
        compose_config([*TINY, "trainer.device=cpu", *overrides])


@pytest.mark.e2e
def test_init_from_a_checkpoint_of_another_model_is_refused(cli, tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(GPT(n_layer=2, n_head=2, n_embd=64, block_size=32).state_dict(), path)
    line = refused(cli, "trainer.device=cpu", f"trainer.init_from={path}")
    assert "trainer.init_from=" in line and "wte.weight is (256, 64)" in line and "(256, 32) in model=" in line


def test_compression_study_preset_sweeps_from_a_saved_model():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["+experiment=compression_study"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.trainer.max_steps == 0 and cfg.parallelism.name == "single"
    params = cfg.hydra.sweeper.params
    assert "int8_dynamic" in params.quantization and "structured" in params.pruning


@pytest.mark.e2e
def test_pruned_and_quantized_run_logs_every_compression_metric(cli):
    proc = cli(*TINY, "trainer.device=cpu", "pruning=l1_unstructured", "pruning.recovery_steps=2",
               "quantization=int8_dynamic", "tracking.run_name=prune_quant")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cli.run_by_name("prune_quant")
    m = run.data.metrics
    for key in COMPRESSION_METRICS:
        assert key in m, key
    assert m["model/size_bytes"] < 0.7 * m["model/size_bytes_uncompressed"]
    assert m["pruning/target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert m["eval/loss_delta"] == pytest.approx((m["eval/loss"] - m["eval/loss_uncompressed"])
                                                 / m["eval/loss_uncompressed"], rel=1e-6)
    assert run.data.tags["pruning"] == "l1_unstructured" and run.data.tags["quantization"] == "int8_dynamic"
    assert run.data.tags["costlab.checkpoint"].endswith("uncompressed/model.pt")
    assert run.data.tags["costlab.compresses_in_training"] == "false"  # one-shot, after training


@pytest.mark.e2e
@pytest.mark.slow
def test_train_time_compression_then_init_from_the_run_without_retraining(cli):
    """Gradual pruning and QAT during training; then a second job starts from the first run's saved
    model with 0 steps, so its uncompressed loss is the first run's to the last digit."""
    proc = cli(*TINY, "trainer.device=cpu", "pruning=l1_unstructured", "pruning.schedule=gradual",
               "pruning.frequency=1", "quantization=qat_int8", "quantization.qat_steps=2", "tracking.run_name=qat")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = cli.run_by_name("qat")
    assert first.data.metrics["pruning/target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert first.data.metrics["quantization/qat_steps"] == 2
    assert first.data.tags["costlab.compresses_in_training"] == "true"  # the options said so: a report knows
    proc = cli(*TINY, "trainer.device=cpu", "trainer.max_steps=0", f"trainer.init_from={first.info.run_id}",
               "pruning=structured", "quantization=int8_weight_only", "tracking.run_name=again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = cli.run_by_name("again").data.metrics
    assert again["eval/loss_uncompressed"] == first.data.metrics["eval/loss_uncompressed"]
    assert again["model/params"] < again["model/params_uncompressed"]
    assert cli.run_by_name("again").data.tags["costlab.compresses_in_training"] == "false"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["pruning=random_unstructured", "pruning.scope=global"],
        ["pruning=ln_structured"],
        ["pruning=structured", "pruning.recovery_steps=2"],
        ["pruning=semi_structured", "pruning.allow_mask_only=true"],
        ["pruning=wanda", "pruning.calibration_batches=2"],
        ["quantization=int8_weight_only"],
        ["model=llama_nano", "pruning=structured", "quantization=int8_dynamic"],
        ["parallelism=ddp", "trainer.nproc_per_node=2", "pruning=wanda", "quantization=int8_dynamic"],
    ],
)
def test_every_cpu_option_runs_end_to_end(cli, overrides):
    proc = cli(*TINY, "trainer.device=cpu", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = cli.runs()[0].data.metrics  # newest first
    for key in COMPRESSION_METRICS:
        assert key in metrics, key
