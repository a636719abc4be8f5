"""Serving many requests at once (costlab/measure/serving.py), in process on tiny models: continuous batching of
costlab's GPTs and static batches of Hugging Face models produce exactly the tokens of one-at-a-time greedy
generation, with mixed prompt and output lengths; the KV cache's bytes per token are predicted from the
shapes and measured from the cache; the ladder, the memory fit and the latency target's choice."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from costlab.measure.names import (
    SERVE_KV_BYTES,
    SERVE_KV_BYTES_PREDICTED,
    SERVE_MAX_CONCURRENCY,
    SERVE_TARGET_CONCURRENCY,
    SERVE_TARGET_SPEEDUP,
    SERVE_TARGET_TOKENS_PER_S,
    SERVE_TOKENS_PER_S,
    SERVE_TPOT_P99,
    SERVE_TTFT_P99,
)
from costlab.measure.serving import (
    Request,
    Served,
    at_target,
    draw_requests,
    fit_lengths,
    fits,
    ladder,
    make_engine,
    model_bytes,
    percentile,
    predicted_kv_bytes_per_token,
    rung_figures,
    serve_ladder,
)
from costlab.models.gpt import GPT
from costlab.pruning.structured import plan_structured, shrink

from .conftest import compose_config

TINY_GPT = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 48}
LLAMA = {**TINY_GPT, "norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}
CPU = torch.device("cpu")


def _gpt(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return GPT(**(LLAMA if kind == "llama" else TINY_GPT)).eval()


def _hf(family: str) -> nn.Module:
    """A tiny Hugging Face model as ``model=hf model.config=<config.json>`` builds it (``qwen2`` and ``mistral``:
    the shipped tiny configs)."""
    import tempfile

    from transformers import GPT2Config, LlamaConfig

    from costlab.models.hf import HFCausalLM

    if family in ("qwen2", "mistral"):
        torch.manual_seed(0)
        return HFCausalLM(config=f"{family}_tiny", block_size=48).eval()

    if family == "gpt2":
        config = GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:  # grouped-query attention: 2 key/value heads for 4 query heads
        config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        torch.manual_seed(0)
        return HFCausalLM(config=folder, block_size=48).eval()


def _requests(n: int = 7) -> list[Request]:
    """Prompts of 3 to 11 tokens and outputs of 2 to 9, mixed."""
    torch.manual_seed(2)
    return [Request(torch.randint(0, 256, (3 + (5 * i) % 9,)), 2 + (3 * i) % 8) for i in range(n)]


@torch.inference_mode()
def _one_at_a_time(model: nn.Module, req: Request) -> list[int]:
    """Greedy generation of one request alone, through the model's own single-sequence cache path."""
    logits, cache = model.forward_with_cache(req.prompt[None], None)
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < req.output_len:
        logits, cache = model.forward_with_cache(torch.tensor([[tokens[-1]]]), cache)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("family", ["gpt", "llama", "hf-llama", "hf-gpt2", "hf-qwen2", "hf-mistral"])
@pytest.mark.parametrize("concurrency", [1, 3])
def test_batched_serving_produces_exactly_the_tokens_of_one_at_a_time_generation(family, concurrency):
    model = _hf(family[3:]) if family.startswith("hf-") else _gpt(family)
    requests = _requests()
    engine = make_engine(model, length=20)
    with torch.inference_mode():
        served, start = engine.serve(requests, concurrency, CPU)
    expected = [_one_at_a_time(model, r) for r in requests]
    assert [s.tokens for s in served] == expected
    # every request was issued, answered and finished in order of time, within the rung
    assert all(start <= s.issued <= s.first <= s.done for s in served)
    # a distinct token sequence per request: no request's output is another's (no cross-talk between slots)
    assert len({tuple(t) for t in expected}) > 1


def test_continuous_batching_refills_a_finished_slot_before_the_longest_request_ends():
    model = _gpt("gpt")
    requests = [Request(torch.arange(4), 12), Request(torch.arange(5), 2), Request(torch.arange(3), 3)]
    with torch.inference_mode():
        served, _ = make_engine(model, length=20).serve(requests, 2, CPU)
    # the third request took the second's slot while the first was still decoding
    assert served[2].issued == served[1].done < served[0].done
    assert served[2].done < served[0].done


def test_static_batches_make_a_request_issued_mid_wave_wait_for_the_next_wave():
    model = _hf("llama")
    requests = [Request(torch.arange(4), 10), Request(torch.arange(5), 2), Request(torch.arange(3), 3)]
    with torch.inference_mode():
        served, _ = make_engine(model, length=20).serve(requests, 2, CPU)
    assert served[2].issued == served[1].done  # its client's previous request ended…
    assert served[2].first > served[0].done  # …but it was answered only after the wave's longest request


@pytest.mark.parametrize("family", ["gpt", "llama", "hf-llama", "hf-gpt2", "pruned", "bf16"])
def test_kv_cache_bytes_per_token_are_predicted_from_the_shapes_as_measured(family):
    if family.startswith("hf-"):
        model = _hf(family[3:])
    else:
        model = _gpt("llama" if family == "llama" else "gpt")
    if family == "pruned":  # structured pruning removes heads: the cache is narrower
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
        shrink(model, plan_structured(model, layers, 0.5, ("mlp", "attn")))
    dtype = torch.bfloat16 if family == "bf16" else torch.float32
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if family == "bf16" else None
    engine = make_engine(model, 20, autocast) if autocast else make_engine(model, 20)
    with torch.inference_mode():
        engine.serve(_requests(3), 2, CPU)
    predicted = predicted_kv_bytes_per_token(model, dtype)
    assert engine.kv_bytes_per_token == pytest.approx(predicted, rel=0.02)
    # independent count: 2 (K and V) x layers x kv heads x head size x bytes
    kv_heads = {"hf-llama": 2, "pruned": 2}.get(family, 4)
    head_dim = 8
    assert predicted == 2 * 2 * kv_heads * head_dim * (2 if family == "bf16" else 4)


def test_the_ladder_stops_at_the_cap_and_at_what_fits():
    assert ladder(32, 10**6) == [1, 2, 4, 8, 16, 32]
    assert ladder(32, 5) == [1, 2, 4, 5]
    assert ladder(6, 100) == [1, 2, 4, 6]
    assert ladder(8, 0) == []
    # 1000 bytes of weights, 10 bytes per token, 20 tokens a sequence: (5000 - 1000) / 200 = 20 sequences
    assert fits(5000, 1000, 10, 20) == 20
    assert fits(500, 1000, 10, 20) == 0


def test_the_target_is_the_fastest_rung_that_meets_both_latency_limits():
    rungs = {
        1: {SERVE_TOKENS_PER_S: 10.0, SERVE_TPOT_P99: 5.0, SERVE_TTFT_P99: 10.0},
        2: {SERVE_TOKENS_PER_S: 18.0, SERVE_TPOT_P99: 9.0, SERVE_TTFT_P99: 30.0},
        4: {SERVE_TOKENS_PER_S: 30.0, SERVE_TPOT_P99: 20.0, SERVE_TTFT_P99: 20.0},  # TPOT over the target
    }
    assert at_target(rungs, tpot_ms_p99=10, ttft_ms_p99=100) == 2
    assert at_target(rungs, tpot_ms_p99=10, ttft_ms_p99=20) == 1
    assert at_target(rungs, tpot_ms_p99=50, ttft_ms_p99=100) == 4
    assert at_target(rungs, tpot_ms_p99=1, ttft_ms_p99=100) is None


def test_rung_figures_and_percentiles():
    served = [Served(0.0, 0.1, 0.5, [1] * 5), Served(0.0, 0.2, 1.0, [1] * 3)]
    f = rung_figures(served, start=0.0)
    assert f[SERVE_TOKENS_PER_S] == pytest.approx(8 / 1.0)
    assert f["serve/ttft_ms_p50"] == pytest.approx(150.0)
    assert f["serve/tpot_ms_p50"] == pytest.approx(1000 * (0.1 + 0.4) / 2)  # 0.4/4 = 0.1 s and 0.8/2 = 0.4 s
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([0, 10], 99) == pytest.approx(9.9)


def test_requests_are_spans_of_the_text_with_lengths_in_range_and_the_same_for_a_seed():
    text = torch.arange(1000) % 251
    a = draw_requests(text, 20, (4, 9), (2, 6), seed=3)
    b = draw_requests(text, 20, (4, 9), (2, 6), seed=3)
    assert [r.prompt.tolist() for r in a] == [r.prompt.tolist() for r in b]
    assert all(4 <= r.prompt.numel() <= 9 and 2 <= r.output_len <= 6 for r in a)
    assert len({r.prompt.numel() for r in a}) > 1 and len({r.output_len for r in a}) > 1
    starts = [int(r.prompt[0]) for r in a]
    assert all(torch.equal(r.prompt, text[s:s + r.prompt.numel()]) for r, s in zip(a, starts, strict=True))
    # lengths that would overrun the model's positions are cut to fit them
    assert fit_lengths((8, 48), (8, 32), 32) == ((8, 16), (8, 16))
    assert fit_lengths((4, 8), (2, 4), 32) == ((4, 8), (2, 4))


def test_the_ladder_serves_final_and_uncompressed_and_prices_nothing_it_did_not_measure():
    cfg = compose_config(["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                          "serve.max_concurrency=4", "serve.requests=4", "serve.prompt_len=[4,8]",
                          "serve.output_len=[2,6]", "serve.memory_gb=1"])
    final, reference = _gpt("gpt"), _gpt("gpt")
    text = torch.randint(0, 256, (500,), dtype=torch.uint8)
    result = serve_ladder({"final": final, "uncompressed": reference}, text, cfg, CPU)
    assert set(result.rungs) == {"final", "uncompressed"} and list(result.rungs["final"]) == [1, 2, 4]
    s = result.summary
    assert s[SERVE_KV_BYTES] == s[SERVE_KV_BYTES_PREDICTED]
    per_sequence = s[SERVE_KV_BYTES_PREDICTED] * (8 + 6)
    assert s[SERVE_MAX_CONCURRENCY] == (1e9 - model_bytes(final)) // per_sequence
    assert s[SERVE_TARGET_CONCURRENCY] in (1, 2, 4)  # a tiny model meets the default target on any machine
    assert s[SERVE_TARGET_TOKENS_PER_S] == result.rungs["final"][s[SERVE_TARGET_CONCURRENCY]][SERVE_TOKENS_PER_S]
    assert math.isfinite(s[SERVE_TARGET_SPEEDUP]) and s[SERVE_TARGET_SPEEDUP] > 0
    steps = result.step_metrics()
    assert set(steps) == {1, 2, 4} and "serve/tpot_ms_p99_uncompressed" in steps[4]
    # a memory budget smaller than the weights serves nothing and says so
    cfg.serve.memory_gb = 1e-6
    small = serve_ladder({"final": final}, text, cfg, CPU)
    assert small.rungs["final"] == {} and small.summary[SERVE_MAX_CONCURRENCY] == 0
    assert SERVE_TARGET_TOKENS_PER_S not in small.summary and "not served" in small.tag


def test_the_mlp_baseline_has_no_batched_cache_path_and_is_not_served():
    from costlab.models.gpt import MLPLM

    assert make_engine(MLPLM(block_size=32, context=4, n_embd=16, hidden=48), 20) is None


@pytest.mark.parametrize("backend", ["pytorch", "torchao"])
def test_an_int8_model_serves_and_its_weights_are_counted_as_stored(backend):
    """Dynamic int8 quantization scales activations per batch (PyTorch: per tensor), so a batched token may
    differ from one generated alone: the engine serves it all the same, and the memory fit counts the weights'
    int8 bytes, not fp32 ones."""
    pytest.importorskip("torchao")
    from costlab.quantization import build_quantization

    cfg = compose_config(["quantization=int8_dynamic", f"quantization.backend={backend}"])
    model = _gpt("gpt")
    dense = model_bytes(model)
    build_quantization(cfg).apply(model, cfg)
    with torch.inference_mode():
        stored = model_bytes(model)
        served, _ = make_engine(model, 20).serve(_requests(4), 2, CPU)
    # the blocks' Linears (72 % of this tiny model's weights; the tied embedding and head stay fp32) shrink ~4x
    assert stored < 0.6 * dense
    assert [len(s.tokens) for s in served] == [r.output_len for r in _requests(4)]


@pytest.mark.parametrize(("family", "kv_dtype", "element"), [
    ("gpt", "bf16", 2), ("gpt", "fp8", 1), ("gpt", "int8", 1), ("llama", "int8", 1), ("hf-llama", "fp8", 1)])
def test_a_smaller_kv_cache_dtype_takes_the_bytes_predicted_for_it(family, kv_dtype, element):
    model = _hf(family[3:]) if family.startswith("hf-") else _gpt(family)
    engine = make_engine(model, 20, kv_dtype=kv_dtype)
    with torch.inference_mode():
        engine.serve(_requests(3), 2, CPU)
    predicted = predicted_kv_bytes_per_token(model, torch.float32, kv_dtype)
    assert engine.kv_bytes_per_token == pytest.approx(predicted, rel=0.02)
    kv_heads, head_dim = (2 if family == "hf-llama" else 4), 8
    # costlab's cache keeps a 4-byte scale per token and head with fp8 and int8; transformers' fp8 one per layer
    scales = 4 * kv_heads if kv_dtype in ("fp8", "int8") and not family.startswith("hf-") else 0
    assert predicted == 2 * 2 * (kv_heads * head_dim * element + scales)


@pytest.mark.parametrize("family", ["gpt", "llama", "hf-llama"])
def test_the_loss_through_the_cache_is_the_models_loss_and_a_quantized_cache_costs_little(family):
    from costlab.measure.serving import kv_cache_loss

    model = _hf(family[3:]) if family.startswith("hf-") else _gpt(family)
    torch.manual_seed(3)
    text = torch.randint(0, 256, (400,), dtype=torch.uint8)
    block = 32
    through = kv_cache_loss(make_engine(model, 20), text, block, windows=3)
    # the same windows' second halves, by the plain forward pass: the cache path computes the model's loss
    starts = torch.linspace(0, text.numel() - block - 1, 3).long().tolist()
    total = count = 0
    with torch.inference_mode():
        for s in starts:
            window = text[s:s + block].long()
            logits = model(window[None])[0]
            total += float(torch.nn.functional.cross_entropy(logits[block // 2:-1], window[block // 2 + 1:],
                                                             reduction="sum"))
            count += block - block // 2 - 1
    assert through == pytest.approx(total / count, rel=1e-5)
    for kv_dtype in ("fp8",) if family.startswith("hf-") else ("bf16", "fp8", "int8"):
        quantized = kv_cache_loss(make_engine(model, 20, kv_dtype=kv_dtype), text, block, windows=3)
        assert quantized != through and quantized == pytest.approx(through, rel=0.01), kv_dtype


def test_a_quantized_slot_cache_scales_each_token_alone_so_batching_changes_no_token():
    model = _gpt("llama")
    with torch.inference_mode():
        alone, _ = make_engine(model, 20, kv_dtype="int8").serve(_requests(), 1, CPU)
        batched, _ = make_engine(model, 20, kv_dtype="int8").serve(_requests(), 3, CPU)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]


def test_the_serve_keys_are_checked_before_any_rank_starts():
    from .conftest import refusal

    assert "shortest exceeds the longest" in str(refusal("serve.prompt_len=[9,3]"))
    assert str(refusal("serve.kv_cache_dtype=int4")).startswith("serve.kv_cache_dtype=int4: choose one of")
    error = refusal("model=hf", "model.config=llama_tiny", "serve.kv_cache_dtype=int8")
    assert str(error).startswith("serve.kv_cache_dtype=int8: model=hf serves with transformers' caches")


def test_transformers_fp8_cache_is_refused_for_sliding_window_models_before_any_rank_starts(tmp_path):
    import json

    from costlab import CONF_DIR
    from costlab.launcher.job import check_job

    from .conftest import compose_config, refusal

    config = json.loads((CONF_DIR / "hf_configs" / "mistral_tiny.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    error = refusal("model=hf", f"model.config={tmp_path}", "serve.kv_cache_dtype=fp8")
    assert "this config has sliding-window layers" in str(error)
    # the same family without a window (the shipped tiny Mistral) takes it, and so does a window when not serving
    check_job(compose_config(["model=hf", "model.config=mistral_tiny", "serve.kv_cache_dtype=fp8"]), False)
    check_job(compose_config(["model=hf", f"model.config={tmp_path}", "serve.kv_cache_dtype=fp8",
                              "serve.enabled=false"]), False)


def test_the_serving_study_preset_serves_one_saved_model_eight_ways():
    from hydra import compose, initialize_config_dir

    from costlab import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["+experiment=serving_study"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.trainer.max_steps == 0
    params = cfg.hydra.sweeper.params
    assert [len(str(params[k]).split(",")) for k in ("pruning", "quantization", "serve.kv_cache_dtype")] == [2, 2, 2]
    assert cfg.serve.enabled and cfg.tracking.log_model
