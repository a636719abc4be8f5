"""Pruning on tiny models, in process: the sparsity asked is the sparsity made, structured shrinking is
exact, masks hold through recovery, and every option composes and validates."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torch import nn

from costlab.compression import target_layers
from costlab.data import build_corpus
from costlab.launcher.preflight import options
from costlab.launcher.validate import validate
from costlab.models.gpt import build_model
from costlab.models.saved import expected_shapes
from costlab.pruning import Pruning, build_pruning
from costlab.pruning.semi_structured import two_four_mask
from costlab.pruning.structured import kept_count, mask_structured, plan_structured, shrink
from costlab.pruning.unstructured import cubic_sparsity
from costlab.pruning.wanda import wanda_masks
from costlab.schema import ConfigError
from costlab.training.trainer import finetune_alone
from tests.conftest import TINY, compose_config

CPU = [*TINY, "trainer.device=cpu"]
MODELS = options("model")


def tiny(*overrides: str):
    base = CPU
    if "model=mlp" in overrides:  # the mlp model has no blocks: keep TINY's data and trainer sizes only
        base = [o for o in CPU if not o.startswith("model.")] + ["model.block_size=32", "model.n_embd=16"]
    cfg = compose_config([*base, *overrides])
    validate(cfg)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model), build_corpus(cfg.data)


def apply(model: nn.Module, corpus, cfg) -> dict[str, float]:
    cpu = torch.device("cpu")
    recover = functools.partial(finetune_alone, corpus=corpus, device=cpu)  # as the trainer hands it over
    return build_pruning(cfg).apply(model, corpus, cfg, cpu, finetune=recover)


def training_hook(model: nn.Module, cfg):
    return build_pruning(cfg).training_hook(model, cfg)


def sparsity(layers: dict[str, nn.Linear]) -> float:
    return sum(int((m.weight == 0).sum()) for m in layers.values()) / sum(m.weight.numel() for m in layers.values())


@pytest.mark.parametrize("name", MODELS)
def test_launcher_layout_matches_the_built_model(name):
    """The launcher reads shapes from the model built on the meta device; they must be the real model's."""
    cfg = compose_config([f"model={name}"])
    with torch.device("meta"):
        meta = build_model(cfg.model)
    # a model too big for this machine (llama_7b, for plans) is compared as built on the meta device
    model = meta if sum(p.numel() for p in meta.parameters()) > 1e9 else build_model(cfg.model)
    shapes, linears = expected_shapes(cfg.model)
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert linears == {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_default_targets_are_the_blocks_linear_layers_only():
    cfg, model, _ = tiny("pruning=l1_unstructured")
    names = set(target_layers(model, cfg.pruning.targets))
    assert names and all(n.startswith("blocks.") for n in names)
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")} == names
    cfg, model, _ = tiny("model=mlp", "pruning=l1_unstructured")
    assert set(target_layers(model, cfg.pruning.targets)) == {"c_fc", "c_proj"}


@pytest.mark.parametrize(
    "overrides, tol",
    [
        (["pruning=l1_unstructured", "pruning.amount=0.6"], 1e-3),
        (["pruning=l1_unstructured", "pruning.amount=0.6", "pruning.scope=global"], 1e-3),
        (["pruning=random_unstructured", "pruning.amount=0.3"], 1e-3),
        (["pruning=random_unstructured", "pruning.amount=0.3", "pruning.scope=global"], 1e-3),
        (["pruning=ln_structured", "pruning.amount=0.25"], 1 / 32),
        (["pruning=wanda", "pruning.amount=0.5", "pruning.calibration_batches=2"], 1e-3),
        (["pruning=semi_structured", "pruning.allow_mask_only=true"], 0.0),
    ],
)
def test_sparsity_made_is_the_amount_asked_and_permanent(overrides, tol):
    cfg, model, corpus = tiny(*overrides)
    head = model.lm_head.weight.detach().clone()
    info = apply(model, corpus, cfg)
    layers = target_layers(model, cfg.pruning.targets)
    assert sparsity(layers) == pytest.approx(cfg.pruning.amount, abs=tol)
    assert info["pruning/target_sparsity"] == pytest.approx(sparsity(layers))
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in [*model.named_parameters(), *model.named_buffers()])
    assert torch.equal(model.lm_head.weight, head) and int((head == 0).sum()) == 0  # the head is not a target


def test_ln_structured_zeroes_whole_rows():
    cfg, model, corpus = tiny("pruning=ln_structured", "pruning.amount=0.5")
    apply(model, corpus, cfg)
    for m in target_layers(model, cfg.pruning.targets).values():
        rows = (m.weight != 0).any(dim=1)
        assert int((~rows).sum()) == round(0.5 * m.out_features)


def test_two_four_pattern():
    w = torch.randn(8, 16)
    mask = two_four_mask(w)
    assert (mask.reshape(8, 4, 4).sum(-1) == 2).all()
    kept = (w.abs() * mask).reshape(8, 4, 4)
    dropped = (w.abs() * ~mask).reshape(8, 4, 4)
    assert (kept.max(-1).values >= dropped.max(-1).values).all()


def test_wanda_keeps_small_weights_on_loud_inputs():
    cfg = compose_config(CPU)
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 1.0, 1.0, 1.0], [0.1, 1.0, 1.0, 1.0]]))
    model = nn.Sequential(lin)
    x = torch.ones(3, 5, 4)
    x[..., 0] = 100.0  # feature 0: tiny weights, huge activations
    masks = wanda_masks(model, {"0": lin}, 0.25, [x], cfg)
    assert masks["0"][:, 0].all()  # |W| alone would prune column 0; |W|·‖X‖ keeps it
    assert int((~masks["0"]).sum()) == 2


@pytest.mark.parametrize(
    "overrides",
    [[], ["model=llama_nano"], ["model.bias=true"], ["model=mlp", "model.hidden=48"], ["pruning.parts=[attn]"]],
)
def test_structured_shrinks_and_matches_the_masked_model(overrides):
    cfg, model, _ = tiny("pruning=structured", "pruning.amount=0.5", *overrides)
    x = torch.randint(0, 256, (2, cfg.model.block_size))
    layers = target_layers(model, cfg.pruning.targets)
    before = sum(p.numel() for p in model.parameters())
    plan = plan_structured(model, layers, 0.5, cfg.pruning.parts)
    with torch.no_grad():
        mask_structured(model, plan)
        masked = model(x)
        shrink(model, plan)
        shrunk = model(x)
    assert sum(p.numel() for p in model.parameters()) < before
    torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-5)


def test_structured_removes_the_amount_of_targeted_parameters():
    cfg, model, corpus = tiny("pruning=structured", "pruning.amount=0.5")
    before = sum(m.weight.numel() for m in target_layers(model, cfg.pruning.targets).values())
    info = apply(model, corpus, cfg)
    after = sum(m.weight.numel() for m in target_layers(model, cfg.pruning.targets).values())
    assert 1 - after / before == pytest.approx(0.5, abs=1e-6) == pytest.approx(info["pruning/target_sparsity"])
    assert model.blocks["0"].attn.c_q.out_features == cfg.model.n_embd // 2  # one of two heads left
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)


def test_kept_widths_round_to_the_multiple_kernels_like():
    assert kept_count(1536, 0.3) == 1075 and kept_count(1536, 0.3, 16) == 1072
    assert kept_count(512, 0.7, 16) == 160 and kept_count(512, 0.99, 16) == 16  # at least one multiple
    assert kept_count(12, 0.5, 16) == 6  # narrower than the multiple: unrounded
    assert kept_count(128, 0.01, 64) == 128  # never more than there is
    mlp_only = ("pruning=structured", "pruning.amount=0.3", "pruning.parts=[mlp]")
    cfg, model, corpus = tiny(*mlp_only)
    apply(model, corpus, cfg)
    assert model.blocks["0"].mlp.c_fc.out_features == 96  # 128 - 38 = 90, rounded to 16s
    cfg, model, corpus = tiny(*mlp_only, "pruning.multiple_of=1")
    apply(model, corpus, cfg)
    assert model.blocks["0"].mlp.c_fc.out_features == 90
    with pytest.raises(ConfigError, match=r"^pruning.multiple_of=0: must be a positive integer"):
        validate(compose_config([*CPU, *mlp_only, "pruning.multiple_of=0"]))


def test_recovery_changes_weights_but_keeps_the_masks():
    cfg, model, corpus = tiny("pruning=l1_unstructured", "pruning.amount=0.5", "pruning.recovery_steps=3")
    start = {n: m.weight.detach().clone() for n, m in target_layers(model, cfg.pruning.targets).items()}
    info = apply(model, corpus, cfg)
    layers = target_layers(model, cfg.pruning.targets)
    assert sparsity(layers) == pytest.approx(0.5, abs=1e-3)
    assert info["pruning/recovery_final_loss"] > 0
    changed = [n for n, m in layers.items() if not torch.equal((m.weight != 0), (start[n] != 0)) or
               not torch.equal(m.weight[m.weight != 0], start[n][m.weight != 0])]
    assert changed  # recovery trained the surviving weights


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.8, 0, 10) == 0
    assert cubic_sparsity(10, 0.8, 0, 10) == pytest.approx(0.8)
    assert cubic_sparsity(20, 0.8, 0, 10) == pytest.approx(0.8)
    assert cubic_sparsity(5, 0.8, 0, 10) == pytest.approx(0.8 * (1 - 0.5**3))
    steps = [cubic_sparsity(s, 0.8, 2, 10) for s in range(12)]
    assert steps == sorted(steps)


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured", "ln_structured"])
def test_gradual_hook_grows_nested_masks_to_the_amount(method):
    cfg, model, _ = tiny(f"pruning={method}", "pruning.schedule=gradual", "pruning.amount=0.5",
                         "pruning.frequency=1", "trainer.max_steps=6")
    hook = training_hook(model, cfg)
    layers = target_layers(model, cfg.pruning.targets)
    previous = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    for step in range(cfg.trainer.max_steps + 1):
        hook(step)
        now = {n: m.weight != 0 for n, m in layers.items()}
        assert all((now[n] <= previous[n]).all() for n in layers)  # pruned weights stay pruned
        previous = now
        if step < cfg.trainer.max_steps:
            with torch.no_grad():  # what an optimizer step does: move every weight, pruned ones too
                for m in layers.values():
                    m.weight.add_(0.01 * torch.randn_like(m.weight))
    tol = 1 / 32 if method == "ln_structured" else 1e-3
    assert sparsity(layers) == pytest.approx(0.5, abs=tol)


def test_gradual_then_oneshot_finish_keeps_the_trained_zeros():
    cfg, model, corpus = tiny("pruning=l1_unstructured", "pruning.schedule=gradual", "pruning.amount=0.4",
                              "trainer.max_steps=4", "pruning.frequency=2")
    hook = training_hook(model, cfg)
    for step in range(5):
        hook(step)
    apply(model, corpus, cfg)
    assert sparsity(target_layers(model, cfg.pruning.targets)) == pytest.approx(0.4, abs=1e-3)


@pytest.mark.parametrize(
    "option", ["none", "l1_unstructured", "random_unstructured", "ln_structured", "structured", "wanda"]
)
def test_every_cpu_option_composes_and_validates(option):
    validate(compose_config([*CPU, f"pruning={option}"]))


def test_semi_structured_needs_cuda_or_mask_only():
    with pytest.raises(ConfigError) as e:
        validate(compose_config([*CPU, "pruning=semi_structured"]))
    assert e.value.key == "pruning"
    validate(compose_config([*CPU, "pruning=semi_structured", "pruning.allow_mask_only=true"]))


def test_targets_may_be_narrowed():
    cfg, model, corpus = tiny("pruning=l1_unstructured", "pruning.targets=[blocks.0.mlp.*]")
    apply(model, corpus, cfg)
    assert sparsity({"a": model.blocks["0"].mlp.c_fc}) == pytest.approx(0.5, abs=1e-3)
    assert sparsity({"a": model.blocks["1"].mlp.c_fc}) == 0
    with open_dict(cfg):
        cfg.pruning.targets = "nothing.*"
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == "pruning.targets"


@pytest.mark.parametrize("option", options("pruning"))
def test_every_option_yaml_instantiates_its_class_whose_arguments_are_the_keys(option):
    node = compose_config([f"pruning={option}"]).pruning
    made = instantiate(node)
    assert isinstance(made, Pruning) and type(made).__module__.startswith("costlab.pruning.")
    assert made.active == (option != "none")
    keys = OmegaConf.to_object(node)
    for key in set(keys) - {"_target_"}:  # every key reaches the object, with the yaml's value
        value = getattr(made, key)
        assert keys[key] == (OmegaConf.to_object(value) if OmegaConf.is_config(value) else value), key


@pytest.mark.parametrize("option", ["wanda", "ln_structured", "structured", "semi_structured"])
def test_scope_is_a_key_only_where_it_means_something(option):
    """Only l1_unstructured and random_unstructured rank weights across layers; elsewhere ``scope`` is no key,
    so setting it is refused (by Hydra when overridden, by the launcher when appended with ``+``)."""
    assert "scope" not in compose_config([f"pruning={option}"]).pruning
    with pytest.raises(ConfigCompositionException, match="scope"):
        compose_config([*CPU, f"pruning={option}", "pruning.scope=local"])
    extra = ["pruning.allow_mask_only=true"] if option == "semi_structured" else []
    with pytest.raises(ConfigError) as e:
        validate(compose_config([*CPU, f"pruning={option}", "+pruning.scope=global", *extra]))
    assert e.value.key == "pruning.scope" and f"no such key in pruning={option}" in e.value.why


def test_global_scope_ranks_weights_across_layers():
    cfg, model, corpus = tiny("pruning=l1_unstructured", "pruning.amount=0.6", "pruning.scope=global")
    apply(model, corpus, cfg)
    layers = target_layers(model, cfg.pruning.targets)
    assert sparsity(layers) == pytest.approx(0.6, abs=1e-3)
    per_layer = [sparsity({n: m}) for n, m in layers.items()]
    assert max(per_layer) - min(per_layer) > 0.05  # layers of different scales lose different shares


def test_the_option_object_is_what_the_worker_calls():
    cfg, model, corpus = tiny("pruning=semi_structured", "pruning.allow_mask_only=true")
    option = build_pruning(cfg)
    assert option.active and not build_pruning(compose_config(CPU)).active
    assert option.training_hook(model, cfg) is None
    assert set(option.layers(model)) == set(target_layers(model, cfg.pruning.targets))
    assert option.apply(model, corpus, cfg, torch.device("cpu"))["pruning/target_sparsity"] == 0.5
    # masks only: no sparse kernels, no speed-up claimed
    assert option.accelerate(model, cfg) == {"pruning/sparse_kernel_layers": 0}
