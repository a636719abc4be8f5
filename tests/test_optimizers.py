"""The ``optimizer`` group: each option is its constructor (its keys that constructor's arguments), takes the
trainer's schedule, learns, and holds exactly the state bytes the memory model predicts from the option."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import open_dict

from costlab.measure.memory import PREDICTED, optimizer_option, predict_state
from costlab.measure.metrics import state_bytes_per_rank
from costlab.measure.names import MEM_GRADS, MEM_OPTIMIZER, MEM_PARAMS
from costlab.models.gpt import build_model
from costlab.models.loss import loss_fn
from costlab.schema import ConfigError, option
from costlab.training.optimizers import build_optimizer, set_lr

from .conftest import TINY, compose_config, refusal

OPTIONS = ["adamw", "adamw_8bit", "adamw_4bit", "adamw_bf16", "sgd"]
# the low-bit updates compile for ~20 s on 2 cores: in-process in the slow suite (the default one runs adamw_bf16,
# the same compiled update with plain bf16 states)
COMPILED = {"adamw_8bit", "adamw_4bit"}
TORCHAO = {"adamw_8bit", "adamw_4bit", "adamw_bf16"}


def _steps(cfg, n: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, 256, (4, cfg.model.block_size))
    losses = []
    for step in range(n):
        set_lr(opt, 1e-2 if step else 1e-3)  # the schedule moves the rate: a tensor rate (torchao) in place
        loss = loss_fn(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize("name", [pytest.param(o, marks=pytest.mark.slow) if o in COMPILED else o for o in OPTIONS])
def test_an_option_learns_and_holds_the_state_bytes_the_memory_model_predicts(name):
    if name in TORCHAO:
        pytest.importorskip("torchao")
    cfg = compose_config([*TINY, f"optimizer={name}", "trainer.device=cpu"])
    model, opt, losses = _steps(cfg, 6)
    assert losses[-1] < losses[0]  # one batch, six steps: it learns it
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([1e-2, 1e-2])
    measured = state_bytes_per_rank(model, opt)
    predicted = predict_state(cfg, 1)
    for part, key in (("params", MEM_PARAMS), ("grads", MEM_GRADS), ("optimizer", MEM_OPTIMIZER)):
        if part == "grads":
            continue  # zeroed after the step; the run measures them inside the step
        assert predicted[f"{PREDICTED}{part}_bytes_per_rank"] == measured[key], part
    # and the state tensors themselves: their plain storages, each counted once
    storages = {}
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                leaves = [getattr(v, n) for n in v.__tensor_flatten__()[0]] if hasattr(v, "__tensor_flatten__") \
                    and type(v) is not torch.Tensor else [v]
                for leaf in leaves:
                    storages[leaf.untyped_storage().data_ptr()] = leaf.untyped_storage().nbytes()
    assert sum(storages.values()) == measured[MEM_OPTIMIZER]


def test_low_bit_states_are_a_fraction_of_adamws_on_large_tensors():
    pytest.importorskip("torchao")
    wide = [*TINY, "model.n_embd=128", "model.n_layer=1", "trainer.device=cpu"]
    key = f"{PREDICTED}optimizer_bytes_per_rank"
    state = {name: predict_state(compose_config([*wide, f"optimizer={name}"]), 1)[key] for name in OPTIONS}
    assert state["adamw_8bit"] / state["adamw"] < 0.3
    assert state["adamw_4bit"] / state["adamw"] < 0.17
    assert state["adamw_bf16"] / state["adamw"] < 0.55
    assert state["sgd"] / state["adamw"] == pytest.approx(0.5, rel=0.01)


def test_sgd_takes_no_betas_and_momentum_zero_keeps_no_state():
    cfg = compose_config([*TINY, "optimizer=sgd", "optimizer.momentum=0.0", "trainer.device=cpu"])
    model, opt, _ = _steps(cfg, 2)
    assert isinstance(opt, torch.optim.SGD) and "betas" not in opt.defaults
    assert state_bytes_per_rank(model, opt)[MEM_OPTIMIZER] == 0 == optimizer_option(cfg).state_bytes(1000)


def test_the_default_optimizer_is_adamw_with_the_trainers_betas():
    cfg = compose_config([*TINY, "trainer.device=cpu", "trainer.betas=[0.8,0.9]"])
    opt = build_optimizer(build_model(cfg.model), cfg)
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.trainer.weight_decay, 0.0]


@pytest.mark.parametrize("overrides, key", [
    (["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0.0"], "optimizer.nesterov"),
    (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum"),
    (["optimizer=adamw_8bit", "optimizer.block_size=0"], "optimizer.block_size"),
    (["optimizer=adamw", "+optimizer.momentum=0.9"], "optimizer.momentum"),
    (["optimizer=adamw", "optimizer._target_=torch.optim.Adagrad"], "optimizer._target_"),
])
def test_a_bad_optimizer_key_is_refused_naming_it(overrides, key):
    e = refusal(*TINY, *overrides)
    assert e.key == key, str(e)


def test_a_config_written_before_the_group_existed_trains_with_adamw():
    cfg = compose_config([*TINY, "trainer.device=cpu"])
    with open_dict(cfg):
        del cfg["optimizer"]
    assert type(build_optimizer(build_model(cfg.model), cfg)) is torch.optim.AdamW
    assert optimizer_option(cfg) == option("optimizer", {"_target_": "torch.optim.AdamW", "name": "adamw"})


def test_a_missing_package_is_refused_naming_the_option(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # Python's own mark of a module that cannot be imported
    with pytest.raises(ConfigError) as e:
        option("optimizer", compose_config(["optimizer=adamw_4bit"]).optimizer).check()
    assert e.value.key == "optimizer" and "torchao" in str(e.value)


# --------------------------------------------------------------------------- end to end, real ranks


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("name, parallelism", [("adamw_8bit", "fsdp"), ("adamw_4bit", "ddp"), ("sgd", "fsdp")])
def test_a_run_with_an_optimizer_option_logs_its_state_beside_the_prediction(cli, name, parallelism):
    if name in TORCHAO:
        pytest.importorskip("torchao")
    run_name = f"optim-{name}-{parallelism}"
    proc = cli(*TINY, f"optimizer={name}", f"parallelism={parallelism}", "trainer.max_steps=6",
               f"tracking.run_name={run_name}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = cli.run_by_name(run_name)
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and tags["optimizer"] == name
    assert m[MEM_OPTIMIZER] == m[f"{PREDICTED}optimizer_bytes_per_rank"]  # exact: shapes and option agree
    curve = cli.loss_curve(run.info.run_id)
    assert len(curve) == 6 and all(map(torch.isfinite, torch.tensor(curve)))
    assert m[MEM_OPTIMIZER] < 2 * m[MEM_PARAMS]  # AdamW's two fp32 states would be twice the fp32 parameters
