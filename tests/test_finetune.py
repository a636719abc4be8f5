"""The ``finetune`` group: LoRA adapters (PEFT) train while the rest is frozen, the memory model predicts the
smaller state exactly, the shipped model has the adapters merged (a plain model of the run's config, which
``costlab.use`` loads), and what cannot carry adapters is refused before any rank starts."""

from __future__ import annotations

import pytest
import torch

from costlab.launcher.job import check_job
from costlab.measure.memory import PREDICTED, predict_state
from costlab.measure.metrics import state_bytes_per_rank
from costlab.measure.names import MEM_OPTIMIZER, MEM_PARAMS
from costlab.models.adapters import apply_finetune, merge_adapters, trainable_params
from costlab.models.gpt import build_model
from costlab.models.loss import loss_fn
from costlab.parallelism.core import load_full_state
from costlab.training.optimizers import build_optimizer

from .conftest import TINY, compose_config, refusal

pytest.importorskip("peft")

HF_TINY = [*(o for o in TINY if not o.startswith("model.")), "model=hf", "model.config=llama_tiny",
           "model.block_size=32"]
LORA = ["finetune=lora", "finetune.rank=2"]  # rank 2 on these 32-wide layers: an adapter much smaller than them


def _lora(*extra: str, base: list[str] = TINY):
    cfg = compose_config([*base, *LORA, "trainer.device=cpu", *extra])  # extra after LORA: it may set the rank
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    return cfg, plain, apply_finetune(build_model(cfg.model), cfg)


@pytest.mark.parametrize("family, optimizer", [
    ("gpt", "adamw"), ("hf", "adamw"), ("gpt", "sgd"), ("gpt", "adamw_bf16"),
    pytest.param("gpt", "adamw_8bit", marks=pytest.mark.slow),  # its update compiles for ~20 s on 2 cores
])
def test_lora_trains_only_its_adapters_and_holds_the_predicted_state(family, optimizer):
    if optimizer.startswith("adamw_"):
        pytest.importorskip("torchao")
    base = [*(HF_TINY if family == "hf" else TINY), f"optimizer={optimizer}"]
    # 128 wide at rank 32: adapters of at least 4096 values, which the low-bit optimizers quantize
    wide = optimizer == "adamw_8bit"
    if wide:
        base.append("model.n_embd=128")
    cfg, plain, model = _lora(*(["finetune.rank=32"] if wide else []), base=base)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert 0 < trainable_params(model) < (0.6 if wide else 0.2) * trainable_params(plain)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, 256, (4, cfg.model.block_size + 1))
    for _ in range(3):
        loss_fn(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
        measured = state_bytes_per_rank(model, opt)
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    predicted = predict_state(cfg, 1)
    assert predicted[f"{PREDICTED}optimizer_bytes_per_rank"] == measured[MEM_OPTIMIZER]
    assert predicted[f"{PREDICTED}params_bytes_per_rank"] == measured[MEM_PARAMS]
    full = predict_state(compose_config([*base, "trainer.device=cpu"]), 1)
    assert measured[MEM_OPTIMIZER] < full[f"{PREDICTED}optimizer_bytes_per_rank"]


def test_the_shipped_model_has_the_adapters_merged_and_predicts_as_the_adapted_one():
    cfg, plain, model = _lora()
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # B starts at zero (the adapted model starts as the base): give it values
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        adapted = model(x)
        shipped = load_full_state(model.state_dict(), cfg, torch.device("cpu"))  # what every layout ships
        merged = shipped(x)
    assert type(shipped) is type(plain) and shipped.state_dict().keys() == plain.state_dict().keys()
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not torch.allclose(adapted, plain(x), atol=1e-3)  # the adapters changed something
    assert merge_adapters(plain) is plain  # no adapters: nothing to do


@pytest.mark.parametrize("overrides, key, says", [
    (["parallelism=tp"], "finetune", "tensor parallel"),
    (["parallelism=pp"], "finetune", "pipeline"),
    (["quantization=qat_int8"], "finetune", "acts on the weights while training"),
    (["finetune.merge=false"], "finetune.merge", "merged"),
    (["finetune.rank=0"], "finetune.rank", "positive"),
    (["finetune.targets=[]"], "finetune.targets", "empty"),
])
def test_what_cannot_carry_adapters_is_refused_naming_the_key(overrides, key, says):
    e = refusal(*TINY, "finetune=lora", *overrides)
    assert e.key == key and says in str(e), str(e)


def test_lora_from_random_weights_is_warned_and_from_a_trained_model_is_not(tmp_path):
    cfg = compose_config([*TINY, "finetune=lora"])
    assert any("random weights" in w for w in check_job(cfg, planning=True))
    model_file = tmp_path / "model.pt"
    torch.save(build_model(cfg.model).state_dict(), model_file)
    cfg = compose_config([*TINY, "finetune=lora", f"trainer.init_from={model_file}"])
    assert not any("random weights" in w for w in check_job(cfg, planning=True))


def test_a_lora_run_fine_tunes_a_trained_run_and_ships_a_plain_model(cli):
    from costlab.use import load_run

    assert cli(*TINY, "tracking.run_name=ft-base", "hydra.run.dir=" + str(cli.out / "base")).returncode == 0
    base = cli.run_by_name("ft-base")
    proc = cli(*TINY, *LORA, f"trainer.init_from={base.info.run_id}", "tracking.run_name=ft-lora",
               "hydra.run.dir=" + str(cli.out / "lora"))
    assert proc.returncode == 0 and "random weights" not in proc.stderr, proc.stderr[-3000:]
    run = cli.run_by_name("ft-lora")
    m = run.data.metrics
    assert run.data.tags["finetune"] == "lora" and run.data.tags["mlflow.runName"] == "ft-lora"
    assert 0 < m["model/trainable_params"] < 0.2 * m["model/params"]
    assert m[MEM_OPTIMIZER] == m[f"{PREDICTED}optimizer_bytes_per_rank"]
    assert m[MEM_OPTIMIZER] < 0.2 * base.data.metrics[MEM_OPTIMIZER]
    loaded = load_run(cli.out / "lora")  # a plain model of the run's config: the adapters were merged
    assert type(loaded.model) is type(build_model(loaded.config.model))
    assert not any("lora" in k for k in loaded.model.state_dict())


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("parallelism, family", [("ddp", "gpt"), ("fsdp", "gpt"), ("fsdp", "hf")])
def test_lora_runs_with_data_parallel_layouts(cli, parallelism, family):
    name = f"lora-{parallelism}-{family}"
    proc = cli(*(HF_TINY if family == "hf" else TINY), *LORA, f"parallelism={parallelism}", f"tracking.run_name={name}",
               timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = cli.run_by_name(name)
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert m[MEM_OPTIMIZER] == m[f"{PREDICTED}optimizer_bytes_per_rank"]
    assert 0 < m["model/trainable_params"] < 0.2 * m["model/params"]
