"""Serving cost: the final model serving many requests at once, as a deployment would, at a ladder of
concurrencies (``serve.*``).

A closed-loop client keeps ``c`` requests in flight (as ``vllm bench serve --max-concurrency c`` does): it
issues the next request as soon as one of its requests has its last token. Requests are drawn from the
run's held-out text: prompt and output lengths uniform in ``serve.prompt_len`` and ``serve.output_len``
with a fixed seed; every output runs to its length (greedy decoding, no end-of-sequence stop), so every
rung and every model decode the same tokens' worth of work.

Two engines, by model family:

- costlab's GPTs: **continuous batching** over ``c`` cache slots (:class:`costlab.models.gpt.SlotCache`). A
  request is prefilled alone as soon as a slot is free; then one decode step advances every sequence in
  flight, each at its own position, and a finished sequence's slot is refilled before the next step.
- Hugging Face models: **static batching** with ``transformers``' ``DynamicCache``. A wave of up to ``c``
  requests is left-padded into one batch (attention mask and position ids say where each prompt
  starts), prefilled together and decoded until its longest output ends; a request issued meanwhile waits
  for the next wave, and its wait counts in its time to first token.

Per request: TTFT = first token - issue; TPOT = (last token - first token) / (output tokens - 1). Per rung:
output tokens / (last token of the rung - its start), and TTFT and TPOT at p50 and p99 over its requests.
Each rung is served once untimed first (warm-up). With an uncompressed reference the two models serve
each rung in turn, in an order that alternates from rung to rung.

The KV cache is measured (the bytes of the cache's tensors over the positions they hold) and predicted
from the model's shapes (2 x the key width of every layer x the bytes of the dtype the keys are computed
in). The largest concurrency that fits ``serve.memory_gb`` is the memory left after the weights over the
KV cache of one sequence at the longest prompt and output; activations of a step are not counted (a
stated omission: they are a few sequences' hidden states, small beside the cache at serving lengths).

``serve.kv_cache_dtype`` is a lever: costlab's cache stores keys and values as computed (``auto``), in bf16, or
in fp8/int8 with a scale per token and head; Hugging Face models take transformers' fp8 ``QuantizedCache``. The
loss through the cache on held-out windows (:func:`kv_cache_loss`) says what it costs in quality.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from costlab.measure.metrics import now
from costlab.measure.names import (
    SERVE_KV_BYTES,
    SERVE_KV_BYTES_PREDICTED,
    SERVE_KV_LOSS,
    SERVE_KV_LOSS_DELTA,
    SERVE_MAX_CONCURRENCY,
    SERVE_TARGET_CONCURRENCY,
    SERVE_TARGET_SPEEDUP,
    SERVE_TARGET_TOKENS_PER_S,
    SERVE_TOKENS_PER_S,
    SERVE_TPOT_P50,
    SERVE_TPOT_P99,
    SERVE_TTFT_P50,
    SERVE_TTFT_P99,
    UNCOMPRESSED_SUFFIX,
)


@dataclass
class Request:
    prompt: torch.Tensor  # (P,) token ids
    output_len: int


@dataclass
class Served:
    """One request's times (seconds on the clock of :func:`costlab.measure.metrics.now`) and tokens."""

    issued: float
    first: float = math.nan
    done: float = math.nan
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.first - self.issued

    @property
    def tpot_s(self) -> float | None:
        return (self.done - self.first) / (len(self.tokens) - 1) if len(self.tokens) > 1 else None


Span = tuple[int, int]  # [shortest, longest]


def fit_lengths(prompt: Span, output: Span, block: int) -> tuple[Span, Span]:
    """The prompt and output length ranges cut down, when they must be, so the longest request fits the
    ``block`` positions the model trained on (outputs keep at least 2 tokens, for a time per output token)."""
    (p_lo, p_hi), (o_lo, o_hi) = prompt, output
    if p_hi + o_hi <= block:
        return (p_lo, p_hi), (o_lo, o_hi)
    o_hi = max(2, min(o_hi, block // 2))
    o_lo = min(o_lo, o_hi)
    p_hi = max(1, min(p_hi, block - o_hi))
    return (min(p_lo, p_hi), p_hi), (o_lo, o_hi)


def draw_requests(text: torch.Tensor, n: int, prompt: Span, output: Span, seed: int) -> list[Request]:
    """``n`` requests whose prompts are spans of the held-out token stream ``text`` (1-D), lengths uniform in
    the ``prompt`` and ``output`` ranges (inclusive), the same for a given ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, o = rng.randint(*prompt), rng.randint(*output)
        start = rng.randrange(0, max(1, text.numel() - p))
        out.append(Request(text[start:start + p].long(), o))
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rung_figures(served: list[Served], start: float) -> dict[str, float]:
    """A rung's throughput and latency percentiles (the names of :data:`RUNG_METRICS`)."""
    tokens = sum(len(s.tokens) for s in served)
    ttft = [1000 * s.ttft_s for s in served]
    tpot = [1000 * t for s in served if (t := s.tpot_s) is not None]
    return {
        SERVE_TOKENS_PER_S: tokens / (max(s.done for s in served) - start),
        SERVE_TTFT_P50: percentile(ttft, 50), SERVE_TTFT_P99: percentile(ttft, 99),
        SERVE_TPOT_P50: percentile(tpot, 50), SERVE_TPOT_P99: percentile(tpot, 99),
    }


# --------------------------------------------------------------------------- the engines


def _argmax(logits: torch.Tensor) -> list[int]:
    return logits[:, -1].argmax(dim=-1).tolist()


class SlotEngine:
    """Continuous batching for models with ``forward_slots`` (costlab's GPTs)."""

    name = "continuous batching (costlab's slot cache)"

    def __init__(self, model: nn.Module, length: int, autocast: Callable[[], AbstractContextManager] = nullcontext,
                 kv_dtype: str = "auto"):
        self.model, self.length, self.autocast, self.kv_dtype = model, length, autocast, kv_dtype
        self.kv_bytes_per_token: float | None = None

    def new_cache(self, slots: int, device: torch.device, length: int | None = None) -> Any:
        from costlab.models.gpt import SlotCache

        cache = SlotCache(slots, length or self.length, self.kv_dtype)
        cache.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        return cache

    def teacher_forced(self, window: torch.Tensor, split: int) -> torch.Tensor:
        """Logits of ``window[split:]`` (1-D) fed in one call after a prefill of ``window[:split]``, so that every
        position they attend to is read back from the cache as it stores it."""
        cache = self.new_cache(1, window.device, window.numel())
        slot = torch.zeros(1, dtype=torch.long, device=window.device)
        with self.autocast():
            self.model.forward_slots(window[None, :split], cache, slot)
            return self.model.forward_slots(window[None, split:], cache, slot)[0]

    def serve(self, requests: list[Request], concurrency: int, device: torch.device) -> tuple[list[Served], float]:
        cache = self.new_cache(concurrency, device)
        pending = deque(enumerate(requests))
        served: list[Served] = [Served(math.nan) for _ in requests]
        active: dict[int, int] = {}  # slot -> request index
        free = list(range(concurrency - 1, -1, -1))
        start = now(device)

        def admit(t: float) -> None:
            while free and pending:
                slot = free.pop()
                i, req = pending.popleft()
                served[i].issued = t
                cache.lengths[slot] = 0
                with self.autocast():
                    logits = self.model.forward_slots(req.prompt[None].to(device), cache,
                                                      torch.tensor([slot], device=device))
                served[i].tokens = _argmax(logits)
                served[i].first = now(device)
                if req.output_len == 1:
                    served[i].done = served[i].first
                    free.append(slot)
                else:
                    active[slot] = i

        admit(start)
        while active:
            slots = sorted(active)
            idx = torch.tensor([[served[active[s]].tokens[-1]] for s in slots], device=device)
            with self.autocast():
                logits = self.model.forward_slots(idx, cache, torch.tensor(slots, device=device))
            t = now(device)
            for s, token in zip(slots, _argmax(logits), strict=True):
                i = active[s]
                served[i].tokens.append(token)
                if len(served[i].tokens) == requests[i].output_len:
                    served[i].done = t
                    del active[s]
                    free.append(s)
            admit(t)
        self.kv_bytes_per_token = cache.bytes() / (concurrency * self.length)
        return served, start


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple | list):
        return [t for item in x for t in _tensors(item)]
    return []


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a ``transformers`` cache's layers hold: keys and values, and a quantized layer's
    codes, scales and full-precision residual (each storage once)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # caches of transformers 4
        layers = [{"k": k, "v": v} for k, v in zip(cache.key_cache, cache.value_cache, strict=True)]
    seen: dict[tuple[int, int], int] = {}
    for layer in layers:
        for t in _tensors(list((layer if isinstance(layer, dict) else vars(layer)).values())):
            seen[(t.data_ptr(), t.numel() * t.element_size())] = t.numel() * t.element_size()
    return sum(seen.values())


HF_KV_CACHE_DTYPES = ("auto", "fp8")  # transformers' DynamicCache, and its QuantizedCache's fp8 backend


class WaveEngine:
    """Static batching for Hugging Face models (:class:`costlab.models.hf.HFCausalLM`), with the cache classes
    of ``transformers`` (``DynamicCache``; ``QuantizedCache`` with its fp8 backend) and left padding."""

    def __init__(self, model: nn.Module, autocast: Callable[[], AbstractContextManager] = nullcontext,
                 kv_dtype: str = "auto"):
        if kv_dtype not in HF_KV_CACHE_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r}: transformers' caches here take {', '.join(HF_KV_CACHE_DTYPES)}")
        self.model, self.autocast, self.kv_dtype = model, autocast, kv_dtype
        self.kv_bytes_per_token: float | None = None
        self.name = "static batching (transformers " + ("QuantizedCache fp8" if kv_dtype == "fp8" else "DynamicCache") \
            + ", left-padded)"

    def new_cache(self) -> Any:
        from transformers import DynamicCache, QuantizedCache

        config = self.model.hf.config
        return QuantizedCache("fp8", config) if self.kv_dtype == "fp8" else DynamicCache(config=config)

    def teacher_forced(self, window: torch.Tensor, split: int) -> torch.Tensor:
        """As :meth:`SlotEngine.teacher_forced` (transformers' fp8 cache stores the prefill and returns it
        unquantized once; what follows reads it back quantized)."""
        cache = self.new_cache()
        ids = window[None]
        positions = torch.arange(ids.size(1), device=ids.device)[None]
        mask = torch.ones_like(ids)
        _, cache = self._forward(ids[:, :split], mask[:, :split], positions[:, :split], cache)
        return self._forward(ids[:, split:], mask, positions[:, split:], cache)[0][0]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, Any]:
        with self.autocast():
            return self.model.forward_padded(ids, mask, positions, cache)

    def serve(self, requests: list[Request], concurrency: int, device: torch.device) -> tuple[list[Served], float]:
        served: list[Served] = [Served(math.nan) for _ in requests]
        start = now(device)
        client_free = [start] * concurrency  # when each client's previous request had its last token
        for first in range(0, len(requests), concurrency):
            wave = list(range(first, min(first + concurrency, len(requests))))
            # each request goes to the client that was freed earliest (the one that issued it first)
            clients = sorted(range(concurrency), key=client_free.__getitem__)[:len(wave)]
            longest = max(requests[i].prompt.numel() for i in wave)
            ids = torch.zeros(len(wave), longest, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(wave):
                p = requests[i].prompt.to(device)
                ids[row, longest - p.numel():], mask[row, longest - p.numel():] = p, 1
                served[i].issued = client_free[clients[row]]
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits, cache = self._forward(ids, mask, positions, self.new_cache())
            prefilled = cache_bytes(cache) if self.kv_bytes_per_token is None else None
            t = now(device)
            for row, (i, token) in enumerate(zip(wave, _argmax(logits), strict=True)):
                served[i].tokens, served[i].first = [token], t
                if requests[i].output_len == 1:
                    served[i].done = client_free[clients[row]] = t
            last = positions[:, -1:]
            steps = max(requests[i].output_len for i in wave) - 1
            for _ in range(steps):
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
                last = last + 1
                idx = torch.tensor([[served[i].tokens[-1]] for i in wave], device=device)
                logits, cache = self._forward(idx, mask, last, cache)
                t = now(device)
                for row, (i, token) in enumerate(zip(wave, _argmax(logits), strict=True)):
                    if len(served[i].tokens) < requests[i].output_len:
                        served[i].tokens.append(token)
                        if len(served[i].tokens) == requests[i].output_len:
                            served[i].done = client_free[clients[row]] = t
            if prefilled is not None:  # what each decoded position added (a layer's fixed scales left out)
                self.kv_bytes_per_token = (cache_bytes(cache) - prefilled) / (len(wave) * steps) if steps \
                    else prefilled / ids.numel()
        return served, start


def make_engine(model: nn.Module, length: int, autocast: Callable[[], AbstractContextManager] = nullcontext,
                kv_dtype: str = "auto") -> SlotEngine | WaveEngine | None:
    """The engine that serves ``model`` with its KV cache in ``kv_dtype`` (None: its family has no batched
    KV-cache path, e.g. the MLP baseline)."""
    if callable(getattr(model, "forward_slots", None)):
        return SlotEngine(model, length, autocast, kv_dtype)
    if callable(getattr(model, "forward_padded", None)) and getattr(model, "stage", None) is None:
        return WaveEngine(model, autocast, kv_dtype)
    return None


# --------------------------------------------------------------------------- memory


def _width(linear: nn.Module) -> int:
    width = getattr(linear, "out_features", None)
    return int(width) if width is not None else int(linear.weight.shape[0])


def predicted_kv_bytes_per_token(model: nn.Module, dtype: torch.dtype, kv_dtype: str = "auto") -> float:
    """2 (keys and values) x the key width summed over layers x the bytes of an element: from each layer's key
    projection where the model has one (costlab's ``c_k``, Llama-style ``k_proj``; pruned layers included),
    else from the config (heads x head size x layers, with grouped-query attention's key/value heads).
    An element is ``dtype`` (what the keys are computed in) for ``kv_dtype=auto``, 2 bytes for bf16, 1 for
    fp8 and int8, which costlab's cache adds a 4-byte scale to per token and head (transformers' fp8 cache
    keeps one per layer: nothing per token)."""
    item = {"auto": torch.empty((), dtype=dtype).element_size(), "bf16": 2}.get(kv_dtype, 1)
    attentions = [m for m in model.modules() if isinstance(getattr(m, "c_k", None), nn.Module)]
    if attentions:  # costlab's GPTs
        widths = [_width(m.c_k) for m in attentions]
        heads = sum(w // m.head_dim for w, m in zip(widths, attentions, strict=True))
        return 2.0 * (sum(widths) * item + (4 * heads if kv_dtype in ("fp8", "int8") else 0))
    keys = [m for name, m in model.named_modules() if name.endswith(".k_proj")]
    if keys:
        return 2.0 * sum(map(_width, keys)) * item
    c = model.hf.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 2.0 * c.num_hidden_layers * kv_heads * head_dim * item


def model_bytes(model: nn.Module) -> int:
    """Bytes of the weights and buffers a server holds, as its state dict stores them (quantized weights by
    their codes and scales, PyTorch's packed int8 Linears included; a tied weight once)."""
    from costlab.measure.metrics import leaves

    seen: set[tuple[int, int]] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():  # no detach: a torchao weight may not, in inference mode
        for leaf in leaves(value):
            key = (leaf.data_ptr(), leaf.numel() * leaf.element_size())
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total


def fits(budget_bytes: float, weights: float, kv_per_token: float, seq_len: int) -> int:
    """How many sequences of ``seq_len`` positions have room for their KV cache beside the weights."""
    return max(0, int((budget_bytes - weights) // (kv_per_token * seq_len)))


def ladder(cap: int, fit: int) -> list[int]:
    """1, 2, 4, … up to ``cap`` and to what fits (``cap`` itself ends the ladder when it is not a power of 2)."""
    top = min(cap, fit)
    rungs = [2 ** k for k in range(top.bit_length()) if 2 ** k <= top]
    if rungs and rungs[-1] != top:
        rungs.append(top)
    return rungs


def kv_cache_loss(engine: SlotEngine | WaveEngine, text: torch.Tensor, block: int, windows: int = 8) -> float:
    """Mean next-token loss (nats) on ``windows`` evenly spaced spans of ``block`` tokens of ``text``, each fed
    as a prefill of its first half and then its second half in one call, so that the second half's tokens
    attend to keys and values read back from ``engine``'s cache as it stores them: the quality a cache dtype
    costs. The loss is over the second halves' predictions."""
    import torch.nn.functional as F

    text = text.long()
    split, total, count = block // 2, 0.0, 0
    starts = torch.linspace(0, text.numel() - block - 1, windows).long().tolist()
    with torch.inference_mode():
        for start in starts:
            window = text[start:start + block]
            logits = engine.teacher_forced(window, split).float()
            total += float(F.cross_entropy(logits[:-1], window[split + 1:], reduction="sum"))
            count += window.numel() - split - 1
    return total / count


def meets(figures: dict[str, float], tpot_ms_p99: float, ttft_ms_p99: float) -> bool:
    return figures[SERVE_TPOT_P99] <= tpot_ms_p99 and figures[SERVE_TTFT_P99] <= ttft_ms_p99


def at_target(rungs: dict[int, dict[str, float]], tpot_ms_p99: float, ttft_ms_p99: float) -> int | None:
    """The concurrency of the highest throughput among the rungs that meet the latency target (None: none does)."""
    ok = [c for c, f in rungs.items() if meets(f, tpot_ms_p99, ttft_ms_p99)]
    return max(ok, key=lambda c: rungs[c][SERVE_TOKENS_PER_S]) if ok else None


# --------------------------------------------------------------------------- the ladder


def memory_budget(serve_cfg: Any, device: torch.device) -> tuple[float, str]:
    """The bytes weights and KV cache may take (``serve.memory_gb``; null: the device's memory), and whence."""
    if serve_cfg.get("memory_gb") is not None:
        return float(serve_cfg.memory_gb) * 1e9, "serve.memory_gb"
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), "the GPU's memory"
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "the machine's RAM"


@dataclass
class Ladder:
    """What :func:`serve_ladder` measured: per model ("final", and "uncompressed" where compressed) its
    figures per concurrency, and the run's summary figures and tag."""

    rungs: dict[str, dict[int, dict[str, float]]]
    summary: dict[str, float]
    tag: str

    def step_metrics(self) -> dict[int, dict[str, float]]:
        """The per-rung figures to log at step = concurrency (the uncompressed model's with a suffix)."""
        out: dict[int, dict[str, float]] = {}
        for model, rungs in self.rungs.items():
            suffix = "" if model == "final" else UNCOMPRESSED_SUFFIX
            for c, figures in rungs.items():
                out.setdefault(c, {}).update({f"{k}{suffix}": v for k, v in figures.items()})
        return out

    def table(self, tpot_ms_p99: float, ttft_ms_p99: float) -> dict[str, list]:
        """The ladder as columns (an MLflow table): one row per model and concurrency."""
        cols: dict[str, list] = {"model": [], "concurrency": []}
        for model, rungs in self.rungs.items():
            for c, figures in rungs.items():
                cols["model"].append(model)
                cols["concurrency"].append(c)
                for k, v in figures.items():
                    cols.setdefault(k.removeprefix("serve/"), []).append(v)
                cols.setdefault("meets_target", []).append(meets(figures, tpot_ms_p99, ttft_ms_p99))
        return cols


def serve_ladder(models: dict[str, nn.Module], text: torch.Tensor, cfg: Any, device: torch.device,
                 autocast: Callable[[], AbstractContextManager] = nullcontext,
                 autocast_dtype: torch.dtype | None = None) -> Ladder | None:
    """Serve each model (``final``, and ``uncompressed`` when there is one) at the ladder of concurrencies
    ``serve.*`` asks for, on requests drawn from ``text`` (the held-out token stream), under ``autocast``,
    whose dtype (None: no autocast) the keys are computed in, else the weights'. None when the final model's
    family has no batched KV-cache path."""
    s = cfg.serve
    kv_dtype = str(s.get("kv_cache_dtype", "auto"))
    prompt, output = fit_lengths(tuple(s.prompt_len), tuple(s.output_len), int(cfg.model.block_size))
    length = prompt[1] + output[1]
    engines = {name: make_engine(m, length, autocast, kv_dtype) for name, m in models.items()}
    if engines["final"] is None:
        return None
    for m in models.values():
        m.eval()
    dtype = autocast_dtype or next((p.dtype for p in models["final"].parameters() if p.is_floating_point()),
                                   torch.float32)
    predicted = predicted_kv_bytes_per_token(models["final"], dtype, kv_dtype)
    budget, source = memory_budget(s, device)
    fit = fits(budget, model_bytes(models["final"]), predicted, length)
    rungs_c = ladder(int(s.max_concurrency), fit)
    requests = draw_requests(text, max([int(s.requests), *(2 * c for c in rungs_c)]), prompt, output, int(s.seed))
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in models}
    order = list(engines.items())
    with torch.inference_mode():
        for k, c in enumerate(rungs_c):
            reqs = requests[:max(int(s.requests), 2 * c)]
            for name, engine in order if k % 2 == 0 else order[::-1]:
                engine.serve(reqs[:c], c, device)  # warm-up, untimed
                served, start = engine.serve(reqs, c, device)
                results[name][c] = rung_figures(served, start)
    summary = {SERVE_KV_BYTES_PREDICTED: predicted, SERVE_MAX_CONCURRENCY: fit}
    if kv_dtype != "auto":  # what the cache's dtype costs in quality, beside the capacity it buys
        block = int(cfg.model.block_size)
        loss = kv_cache_loss(engines["final"], text, block)
        reference = kv_cache_loss(make_engine(models["final"], length, autocast), text, block)
        summary.update({SERVE_KV_LOSS: loss, SERVE_KV_LOSS_DELTA: (loss - reference) / reference})
    if engines["final"].kv_bytes_per_token is not None:
        summary[SERVE_KV_BYTES] = engines["final"].kv_bytes_per_token
    tag = (f"{engines['final'].name}, KV cache {kv_dtype}; prompts of {prompt[0]}-{prompt[1]} and outputs of "
           f"{output[0]}-{output[1]} tokens from the held-out text (seed {s.seed}), at least {s.requests} requests "
           f"per rung; memory budget {budget / 1e9:.3g} GB ({source}); target p99 TPOT <= {s.tpot_ms_p99:g} ms, "
           f"p99 TTFT <= {s.ttft_ms_p99:g} ms")
    if not rungs_c:
        return Ladder(results, summary, tag + "; not served: not one sequence's KV cache fits beside the weights")
    best = {name: at_target(r, float(s.tpot_ms_p99), float(s.ttft_ms_p99)) for name, r in results.items()}
    if best["final"] is None:
        tag += "; no concurrency met the latency target"
    else:
        summary[SERVE_TARGET_CONCURRENCY] = best["final"]
        summary[SERVE_TARGET_TOKENS_PER_S] = results["final"][best["final"]][SERVE_TOKENS_PER_S]
        ref = best.get("uncompressed")
        if ref is not None:
            tps = results["uncompressed"][ref][SERVE_TOKENS_PER_S]
            summary[SERVE_TARGET_TOKENS_PER_S + UNCOMPRESSED_SUFFIX] = tps
            summary[SERVE_TARGET_SPEEDUP] = summary[SERVE_TARGET_TOKENS_PER_S] / tps
    return Ladder(results, summary, tag)


def write_ladder(path: Path, ladder: Ladder, cfg: Any) -> None:
    """The ladder for the launcher to log: per-rung metrics by concurrency, the table, and the target."""
    import json

    s = cfg.serve
    path.write_text(json.dumps({
        "steps": {str(c): m for c, m in ladder.step_metrics().items()},
        "table": ladder.table(float(s.tpot_ms_p99), float(s.ttft_ms_p99)),
        "target": {"tpot_ms_p99": float(s.tpot_ms_p99), "ttft_ms_p99": float(s.ttft_ms_p99)},
    }))
