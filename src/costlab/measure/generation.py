"""Generation speed: autoregressive greedy decoding with a KV cache, timed as a server sees it.

Two figures per model: the time to first token (the prefill pass over the prompt, and the choice of the
first new token) and the decode rate (tokens per second of the one-token-at-a-time loop that follows).
Any model with a ``forward_with_cache(idx, cache) -> (logits, cache)`` method can be timed: ``cache=None``
starts from position 0, otherwise ``idx`` holds the token(s) that follow the cached ones.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from costlab.measure.metrics import now
from costlab.measure.names import INFER_DECODE_SPEEDUP, INFER_DECODE_TOKENS_PER_S, INFER_TTFT

GENERATION_TAG = "costlab.generation"  # the lengths timed: trainer.gen_*, cut down to fit model.block_size
TTFT = "ttft_s"
DECODE_TOKENS_PER_S = "decode_tokens_per_s"


def generation_lengths(cfg) -> tuple[int, int]:
    """(prompt tokens, new tokens) to time: ``trainer.gen_prompt_len`` and ``trainer.gen_tokens``, cut down to
    fit ``model.block_size`` (the longest sequence the run trained on; a learned position table ends there)
    when they do not: half the block for the new tokens at most, the rest for the prompt."""
    t, block = cfg.trainer, int(cfg.model.block_size)
    prompt, new = int(t.gen_prompt_len), int(t.gen_tokens)
    if prompt + new <= block:
        return prompt, new
    new = max(2, min(new, block // 2))
    return max(1, min(prompt, block - new)), new


def check_generates(models: dict[str, nn.Module]) -> None:
    """Refuse, naming it, a model that has no KV-cache path."""
    for name, m in models.items():
        if not callable(getattr(m, "forward_with_cache", None)):
            raise TypeError(
                f"model {name!r} ({type(m).__name__}) cannot be timed generating: it has no "
                "forward_with_cache(idx, cache) -> (logits, cache) method"
            )


@torch.inference_mode()
def time_generation(
    models: dict[str, nn.Module],
    prompt: torch.Tensor,
    new_tokens: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    warmup: int = 2,
    iters: int = 5,
) -> dict[str, dict[str, float]]:
    """Per model: ``ttft_s``, the median seconds of the prefill pass that yields the first of ``new_tokens``
    greedy tokens after ``prompt`` (B, P); ``decode_tokens_per_s``, B x (new_tokens - 1) over the median
    seconds of the decode loop that yields the rest. Warm-up generations are left out.

    With several models the generations are interleaved, in an order that alternates every iteration (as
    :func:`costlab.measure.metrics.time_inference` does), so load from elsewhere falls on all of them alike.
    """
    check_generates(models)
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: need at least 2 (the first is prefill, the rest decode)")
    if prompt.dim() != 2 or prompt.size(1) < 1:
        raise ValueError(f"prompt must be token ids of shape (batch, length), got {tuple(prompt.shape)}")
    for m in models.values():
        m.eval()
    device = prompt.device
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    items = list(models.items())
    for i in range(warmup + iters):
        for name, m in items if i % 2 else items[::-1]:
            t0 = now(device)
            with autocast():
                logits, cache = m.forward_with_cache(prompt, None)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            t1 = now(device)
            for _ in range(new_tokens - 1):
                with autocast():
                    logits, cache = m.forward_with_cache(token, cache)
                token = logits[:, -1].argmax(dim=-1, keepdim=True)
            t2 = now(device)
            if i >= warmup:
                prefill[name].append(t1 - t0)
                decode[name].append(t2 - t1)
    decoded = prompt.size(0) * (new_tokens - 1)
    return {
        name: {TTFT: statistics.median(prefill[name]), DECODE_TOKENS_PER_S: decoded / statistics.median(decode[name])}
        for name in models
    }


def generation_metrics(final: dict[str, float], reference: dict[str, float] | None = None) -> dict[str, float]:
    """The logged figures of :func:`time_generation`'s result for the final model, and, when there is one,
    for the uncompressed ``reference`` timed beside it."""
    out = {INFER_TTFT: 1000 * final[TTFT], INFER_DECODE_TOKENS_PER_S: final[DECODE_TOKENS_PER_S]}
    if reference is not None:
        out.update({
            "infer/ttft_ms_uncompressed": 1000 * reference[TTFT],
            "infer/decode_tokens_per_s_uncompressed": reference[DECODE_TOKENS_PER_S],
            INFER_DECODE_SPEEDUP: final[DECODE_TOKENS_PER_S] / reference[DECODE_TOKENS_PER_S],
        })
    return out
