"""Generation with a KV cache on tiny models, in process: the cached path gives the plain forward's logits
(learned positions, rope, the mlp model, a structurally pruned GPT, an int8 weight-only GPT), and the timer
returns finite figures for every model it is given."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from costlab.measure.generation import DECODE_TOKENS_PER_S, TTFT, generation_metrics, time_generation
from costlab.measure.names import INFER_DECODE_SPEEDUP, INFER_DECODE_TOKENS_PER_S, INFER_TTFT
from costlab.models.gpt import GPT, MLPLM
from costlab.pruning.structured import plan_structured, shrink

TINY_GPT = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32}
LLAMA = {**TINY_GPT, "norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPLM(block_size=32, context=4, n_embd=16, hidden=48).eval()
    return GPT(**(LLAMA if kind == "llama" else TINY_GPT)).eval()


@torch.inference_mode()
def _assert_cache_matches_forward(model: nn.Module, prompt_len: int = 7, steps: int = 6) -> None:
    """Prefill logits == forward(prompt); each decoded step == forward(prompt + tokens so far)[:, -1]."""
    torch.manual_seed(1)
    seq = torch.randint(0, 256, (2, prompt_len))
    logits, cache = model.forward_with_cache(seq, None)
    torch.testing.assert_close(logits, model(seq), rtol=1e-5, atol=1e-5)
    for _ in range(steps):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        seq = torch.cat((seq, token), dim=1)
        logits, cache = model.forward_with_cache(token, cache)
        assert logits.shape == (2, 1, 256)
        torch.testing.assert_close(logits[:, -1], model(seq)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt", "llama", "mlp"])
def test_cached_generation_gives_the_forward_logits(kind):
    _assert_cache_matches_forward(_tiny(kind))


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_several_new_tokens_after_a_cache_see_only_what_precedes_them(kind):
    model = _tiny(kind)
    x = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        _, cache = model.forward_with_cache(x[:, :5], None)
        logits, cache = model.forward_with_cache(x[:, 5:], cache)
        torch.testing.assert_close(logits, model(x)[:, 5:], rtol=1e-5, atol=1e-5)
    assert cache.pos == 12


def test_generation_past_the_position_table_is_refused():
    model = _tiny("gpt")
    with torch.inference_mode():
        _, cache = model.forward_with_cache(torch.zeros(1, 32, dtype=torch.long), None)
        with pytest.raises(ValueError, match="block_size=32"):
            model.forward_with_cache(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_cached_generation_holds_after_structured_pruning(kind):
    model = _tiny(kind)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    heads = model.blocks["0"].attn.c_q.out_features
    shrink(model, plan_structured(model, layers, 0.5, ("mlp", "attn")))
    assert model.blocks["0"].attn.c_q.out_features < heads  # heads really went: the cache is narrower too
    _assert_cache_matches_forward(model)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_cached_generation_holds_after_int8_weight_only_quantization(kind):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = _tiny(kind)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear)
              and fqn.startswith("blocks."))
    assert type(model.blocks["0"].attn.c_q.weight) not in (torch.Tensor, nn.Parameter)
    _assert_cache_matches_forward(model)  # the same quantized model, with and without the cache


def test_time_generation_returns_finite_positive_figures_for_every_model():
    models = {"final": _tiny("gpt"), "uncompressed": _tiny("mlp")}
    prompt = torch.randint(0, 256, (2, 8))
    out = time_generation(models, prompt, new_tokens=4, warmup=1, iters=2)
    assert set(out) == {"final", "uncompressed"}
    for figures in out.values():
        assert set(figures) == {TTFT, DECODE_TOKENS_PER_S}
        assert all(math.isfinite(v) and v > 0 for v in figures.values())
    metrics = generation_metrics(out["final"], out["uncompressed"])
    assert metrics[INFER_TTFT] == pytest.approx(1000 * out["final"][TTFT])
    assert metrics[INFER_DECODE_SPEEDUP] == pytest.approx(
        out["final"][DECODE_TOKENS_PER_S] / out["uncompressed"][DECODE_TOKENS_PER_S])
    assert set(generation_metrics(out["final"])) == {INFER_TTFT, INFER_DECODE_TOKENS_PER_S}


def test_time_generation_refuses_a_model_without_a_cache_path_by_name():
    models = {"final": _tiny("gpt"), "plain": nn.Linear(4, 4)}
    with pytest.raises(TypeError, match=r"'plain' \(Linear\).*forward_with_cache"):
        time_generation(models, torch.zeros(1, 4, dtype=torch.long), new_tokens=2)


@pytest.mark.parametrize("overrides", [[], ["model=llama_nano", "pruning=structured", "quantization=int8_dynamic"]])
def test_the_final_evaluation_logs_generation_speed(overrides, tmp_path):
    from costlab.data import build_corpus
    from costlab.launcher.validate import validate
    from costlab.models.gpt import build_model
    from costlab.parallelism.core import DistEnv
    from costlab.training.evaluation import evaluate_final
    from tests.conftest import TINY, compose_config

    cfg = compose_config([*overrides, *TINY, "trainer.device=cpu"])
    validate(cfg)
    torch.manual_seed(0)
    model, corpus = build_model(cfg.model), build_corpus(cfg.data)
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    out, _ = evaluate_final(model, corpus, cfg, env, tmp_path)
    keys = [INFER_TTFT, INFER_DECODE_TOKENS_PER_S]
    if overrides:
        keys += ["infer/ttft_ms_uncompressed", "infer/decode_tokens_per_s_uncompressed", INFER_DECODE_SPEEDUP]
    assert all(math.isfinite(out[k]) and out[k] > 0 for k in keys), {k: out.get(k) for k in keys}
    if not overrides:
        assert INFER_DECODE_SPEEDUP not in out
