"""Quantization with real torchao on tiny models, in process: files shrink, saved models load back with
the same loss, QAT trains then converts, and the whole compress step measures what it claims."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from costlab.compression import target_layers
from costlab.data import build_corpus, eval_batches
from costlab.launcher.preflight import options
from costlab.launcher.validate import validate
from costlab.measure.metrics import count_params, save_model, sparse_savings
from costlab.models.gpt import build_model
from costlab.models.loss import evaluate
from costlab.models.saved import load_model
from costlab.parallelism.core import DistEnv
from costlab.quantization import Quantization, build_quantization
from costlab.quantization.base import BACKEND_TAG
from costlab.quantization.pytorch_int8 import dynamic_linear
from costlab.quantization.qat import strip_fake_quant
from costlab.schema import ConfigError
from costlab.training.evaluation import evaluate_final
from tests.conftest import TINY, compose_config, requires_cuda

CPU = [*TINY, "trainer.device=cpu"]
ENV = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def tiny(*overrides: str, base: list[str] = CPU):
    cfg = compose_config([*base, *overrides])
    validate(cfg)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model), build_corpus(cfg.data)


def apply(model: nn.Module, cfg) -> dict[str, float]:
    return build_quantization(cfg).apply(model, cfg)


def val_loss(model: nn.Module, cfg, corpus) -> float:
    batches = eval_batches(corpus.val, cfg.model.block_size, cfg.trainer.eval_batch_size, cfg.trainer.eval_batches)
    return evaluate(model, batches, cfg, next(model.parameters()).device)


@pytest.mark.parametrize("option", ["int8_dynamic", "int8_weight_only"])
def test_quantized_file_is_smaller_and_loads_back_with_the_same_loss(option, tmp_path):
    cfg, model, corpus = tiny(f"quantization={option}", "quantization.backend=torchao")
    dense = save_model(model, tmp_path / "dense" / "model.pt")
    info = apply(model, cfg)
    assert info["quantization/layers"] == len(target_layers(model, cfg.quantization.targets)) == 12
    assert type(model.blocks["0"].attn.c_q.weight).__module__.startswith("torchao")
    assert model.lm_head.weight is model.wte.weight  # the head is not targeted: the tie survives
    size = save_model(model, tmp_path / "model.pt")
    assert size < 0.65 * dense  # the blocks' 12 matrices shrink 4x; the embeddings stay fp32
    loss = val_loss(model, cfg, corpus)
    loaded = load_model(cfg.model, tmp_path / "model.pt")
    assert type(loaded.blocks["0"].attn.c_q.weight) is type(model.blocks["0"].attn.c_q.weight)
    assert loaded.lm_head.weight is loaded.wte.weight
    assert val_loss(loaded, cfg, corpus) == loss


def test_pytorch_backend_saves_reloads_and_evaluates_to_the_same_loss(tmp_path):
    cfg, model, corpus = tiny("quantization=int8_dynamic", "quantization.backend=pytorch")
    dense = save_model(model, tmp_path / "dense" / "model.pt")
    params, _ = count_params(model)
    ref = val_loss(model, cfg, corpus)
    q = build_quantization(cfg)
    info = q.apply(model, cfg)
    assert info["quantization/layers"] == 12 and "quantization/probe_ms_torchao" not in info  # no probe asked for
    assert q.tags == {BACKEND_TAG: "pytorch", "quantization/engine": "x86"}
    assert isinstance(model.blocks["0"].mlp.c_fc, dynamic_linear())
    assert model.lm_head.weight is model.wte.weight
    assert count_params(model)[0] == params  # the packed weights are still counted
    size = save_model(model, tmp_path / "model.pt")
    assert size < 0.65 * dense
    loss = val_loss(model, cfg, corpus)
    assert loss == pytest.approx(ref, rel=0.02) and loss != ref  # int8 rounding moved it, a little
    loaded = load_model(cfg.model, tmp_path / "model.pt")
    assert isinstance(loaded.blocks["1"].attn.c_q, dynamic_linear())
    assert val_loss(loaded, cfg, corpus) == loss


def test_auto_backend_times_both_on_the_models_shapes_and_runs_the_faster(tmp_path):
    cfg, model, _ = tiny("quantization=int8_dynamic")
    q = build_quantization(cfg)
    info = q.apply(model, cfg)
    timings = {b: info[f"quantization/probe_ms_{b}"] for b in ("float", "torchao", "pytorch")}
    assert all(v > 0 for v in timings.values())
    chosen = q.tags[BACKEND_TAG]
    assert chosen == min(("torchao", "pytorch"), key=timings.__getitem__)
    packed = isinstance(model.blocks["0"].mlp.c_fc, dynamic_linear())
    assert packed == (chosen == "pytorch")


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (["quantization=int8_dynamic", "quantization.backend=pytorch", "precision=bf16"], "quantization.backend",
         "fp32 activations"),
        (["quantization=int8_dynamic", "quantization.backend=fast"], "quantization.backend",
         "auto, torchao or pytorch"),
        (["quantization=int8_dynamic", "quantization.backend=pytorch", "quantization.engine=qnnpackx"],
         "quantization.engine", "supports"),
        (["quantization=int8_weight_only", "quantization.backend=pytorch"], "quantization.backend", "weight-only"),
    ],
)
def test_int8_backend_refusals_name_the_key(overrides, key, says):
    with pytest.raises(ConfigError) as e:
        validate(compose_config([*CPU, *overrides]))
    assert e.value.key == key and says in str(e.value)


def test_auto_uses_torchao_without_a_probe_where_pytorchs_kernels_cannot_run():
    cfg, model, _ = tiny("quantization=int8_dynamic", "precision=bf16")
    q = build_quantization(cfg)
    info = q.apply(model, cfg)
    assert q.tags == {BACKEND_TAG: "torchao"} and not any("probe" in k for k in info)


def test_qat_trains_with_fake_quant_only_for_the_last_steps_then_converts():
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    cfg, model, _ = tiny("quantization=qat_int8", "quantization.qat_steps=2", "trainer.max_steps=5")
    params = {id(p) for p in model.parameters()}
    hook = build_quantization(cfg).training_hook(model, cfg)
    fake = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(fake) == 12 and {id(p) for p in model.parameters()} == params  # same weights: optimizers keep working
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        plain = model(x)
        hook(2)
        assert torch.equal(model(x), plain)  # switched off before the last qat_steps
        hook(3)
        faked = model(x)
    assert not torch.equal(faked, plain)
    assert strip_fake_quant(model) == 12
    apply(model, cfg)
    with torch.no_grad():  # the int8 kernels compute what training simulated
        torch.testing.assert_close(model(x), faked, atol=2e-3, rtol=0)


def test_sparse_encoding_counts_zeros_once_and_not_in_the_dense_file(tmp_path):
    t = torch.zeros(64, 64)
    t[:, :16] = 1.0
    state = {"a": t, "tied": t}
    saved = sparse_savings(state)
    dense, sparse = 64 * 64 * 4, 64 * 16 * 4 + 64 * 64 // 8
    assert saved == dense - sparse


def test_count_params_sees_through_quantized_tensors():
    cfg, model, _ = tiny("quantization=int8_weight_only")
    with torch.no_grad():
        model.blocks["0"].mlp.c_fc.weight[:, :8] = 0
    before = count_params(model)
    apply(model, cfg)
    total, nonzero = count_params(model)
    assert total == before[0] and nonzero <= before[1]


class LinearOnlyWeight(torch.Tensor):
    """A weight that computes a linear layer and nothing else, as torchao's int4 tile-packed weights do on a
    GPU (no ``aten.dequantize``): every other op on it fails."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device)

    def __init__(self, data: torch.Tensor):
        self.values = data

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            x, w, *rest = args
            return torch.nn.functional.linear(x, w.values, *rest, **(kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter detaches what it wraps
            return LinearOnlyWeight(args[0].values)
        raise NotImplementedError(f"{func} dispatched on a linear-only weight")


def test_count_params_reads_a_weight_that_only_computes_linear():
    values = torch.randn(8, 16)
    values[:, :4] = 0
    with pytest.raises(NotImplementedError):
        LinearOnlyWeight(values).dequantize()
    layer = nn.Linear(16, 8, bias=False)
    layer.weight = nn.Parameter(LinearOnlyWeight(values), requires_grad=False)
    assert count_params(layer) == (8 * 16, int(torch.count_nonzero(values)))


@pytest.mark.parametrize(
    "overrides",
    [
        ["pruning=l1_unstructured", "quantization=int8_dynamic"],
        ["pruning=structured", "quantization=int8_weight_only"],
        ["pruning=wanda", "pruning.calibration_batches=1", "quantization=int8_dynamic"],
    ],
)
def test_prune_then_quantize_measures_and_round_trips(overrides, tmp_path):
    cfg, model, corpus = tiny(*overrides)
    out, tags = evaluate_final(model, corpus, cfg, ENV, tmp_path)
    assert out["model/size_bytes"] < out["model/size_bytes_uncompressed"]
    assert out["model/size_bytes_sparse"] <= out["model/size_bytes"]
    assert out["eval/loss_delta"] == pytest.approx(
        (out["eval/loss"] - out["eval/loss_uncompressed"]) / out["eval/loss_uncompressed"])
    assert out["infer/speedup"] == pytest.approx(out["infer/tokens_per_s"] / out["infer/tokens_per_s_uncompressed"])
    assert (tmp_path / "uncompressed" / "model.pt").is_file()
    assert tags[BACKEND_TAG] in ("torchao", "pytorch")
    loaded = load_model(cfg.model, tmp_path / "model.pt")
    assert val_loss(loaded, cfg, corpus) == pytest.approx(out["eval/loss"], abs=1e-6)
    if cfg.pruning.name == "structured":
        assert out["model/params"] < out["model/params_uncompressed"]
    else:
        assert out["model/params"] == out["model/params_uncompressed"] and out["model/sparsity"] > 0.2


def test_unstructured_pruning_claims_no_dense_saving(tmp_path):
    cfg, model, corpus = tiny("pruning=l1_unstructured", "pruning.amount=0.7")
    out, tags = evaluate_final(model, corpus, cfg, ENV, tmp_path)
    assert list(tags) == ["costlab.generation", "costlab.serve"]  # nothing was quantized: no backend named
    assert out["model/size_bytes"] == out["model/size_bytes_uncompressed"]  # zeros in a dense file cost the same
    assert out["model/size_bytes_sparse"] < 0.75 * out["model/size_bytes"]


@pytest.mark.parametrize("option", ["none", "int8_dynamic", "int8_weight_only", "qat_int8"])
def test_every_cpu_option_composes_and_validates(option):
    qat = ["quantization.qat_steps=2"] if option == "qat_int8" else []  # TINY trains 4 steps
    validate(compose_config([*CPU, f"quantization={option}", *qat]))


@pytest.mark.parametrize("option", ["int4_weight_only", "fp8"])
def test_gpu_only_quantization_is_refused_on_cpu(option):
    with pytest.raises(ConfigError) as e:
        validate(compose_config([*CPU, f"quantization={option}"]))
    assert e.value.key == "quantization" and "CUDA" in e.value.why


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("option", ["int8_dynamic", "int4_weight_only", "fp8", "semi_structured"])
def test_gpu_compression_round_trip(option, tmp_path):
    from costlab.measure.machine import visible_gpus

    need = {"fp8": (8, 9), "int4_weight_only": (8, 0), "semi_structured": (8, 0)}.get(option, (0, 0))
    if min(g.capability for g in visible_gpus()) < need:
        pytest.skip(f"{option} needs compute capability {need}")
    group = "pruning" if option == "semi_structured" else "quantization"
    gpu = ["trainer.device=cuda", "precision=bf16", "model.n_embd=128", "model.n_head=2"]
    cfg, model, corpus = tiny(f"{group}={option}", base=[*TINY, *gpu])
    model.cuda()
    out, _ = evaluate_final(model, corpus, cfg, DistEnv(0, 0, 1, 1, torch.device("cuda")), tmp_path)
    assert out["eval/loss_delta"] < 0.05
    assert out["infer/speedup"] > 0
    if group == "quantization":
        assert out["model/size_bytes"] < out["model/size_bytes_uncompressed"]
        loaded = load_model(cfg.model, tmp_path / "model.pt", "cuda")
        assert val_loss(loaded, cfg, corpus) == pytest.approx(out["eval/loss"], rel=1e-3)
    else:
        assert out["pruning/sparse_kernel_layers"] == 12


@pytest.mark.parametrize("option", options("quantization"))
def test_every_option_yaml_instantiates_its_class_whose_arguments_are_the_keys(option):
    node = compose_config([f"quantization={option}"]).quantization
    made = instantiate(node)
    assert isinstance(made, Quantization) and type(made).__module__.startswith("costlab.quantization.")
    assert made.active == (option != "none")
    keys = OmegaConf.to_object(node)
    for key in set(keys) - {"_target_"}:  # every key reaches the object, with the yaml's value
        value = getattr(made, key)
        assert keys[key] == (OmegaConf.to_object(value) if OmegaConf.is_config(value) else value), key


def test_qat_reference_strips_fake_quant_and_reports_the_steps():
    cfg, model, _ = tiny("quantization=qat_int8", "quantization.qat_steps=2")
    qat = build_quantization(cfg)
    qat.training_hook(model, cfg)
    assert qat.reference(model) == {"quantization/qat_steps": 2}
    assert sum(type(m) is nn.Linear for m in model.modules()) == 12 + 1  # the blocks' layers and lm_head
    assert qat.reference(model) == {}  # nothing left to strip
    assert build_quantization(compose_config([*CPU, "quantization=int8_dynamic"])).reference(model) == {}


def test_the_option_object_is_what_the_worker_calls():
    cfg, model, _ = tiny("quantization=int8_weight_only")
    option = build_quantization(cfg)
    assert option.active and not build_quantization(compose_config(CPU)).active
    assert option.training_hook(model, cfg) is None
    assert strip_fake_quant(model) == 0 and option.reference(model) == {}
    assert option.apply(model, cfg) == {"quantization/layers": 12}
