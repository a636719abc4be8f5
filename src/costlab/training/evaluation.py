"""The final model measured on rank 0: quality, size on disk and inference speed, before and after
compression, in the same process on the same batches, so every delta is a measurement.

What compression does belongs to the ``pruning`` and ``quantization`` options; which file a run saved
is the worker's bookkeeping. This module only measures, and names what it measured.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from costlab.data import ByteCorpus, eval_batches
from costlab.measure.generation import GENERATION_TAG, generation_lengths, generation_metrics, time_generation
from costlab.measure.metrics import count_params, save_model, sparse_savings, time_inference
from costlab.measure.names import (
    EVAL_BITS_PER_BYTE,
    EVAL_LOSS,
    INFER_LATENCY,
    INFER_SPEEDUP,
    INFER_TOKENS_PER_S,
    LADDER_FILE,
    MODEL_SIZE,
    SERVE_TAG,
)
from costlab.measure.serving import serve_ladder, write_ladder
from costlab.models.loss import evaluate
from costlab.models.saved import FINAL, UNCOMPRESSED
from costlab.parallelism.core import DistEnv
from costlab.precision import autocast, autocast_dtype
from costlab.pruning import build_pruning
from costlab.quantization import build_quantization
from costlab.training.trainer import finetune_alone


@dataclass
class Saved:
    """A model as saved for shipping: its bytes on disk (dense, and as a sparse encoding would take
    them) and its parameters."""

    size_bytes: int
    sparse_size_bytes: int
    params: int
    nonzero_params: int


def save_and_count(model: nn.Module, path: Path) -> Saved:
    size = save_model(model, path)
    params, nonzero = count_params(model)
    return Saved(size, size - sparse_savings(model.state_dict()), params, nonzero)


def infer_batch(corpus: ByteCorpus, cfg: DictConfig, device: torch.device) -> torch.Tensor:
    """The fixed batch every inference figure is measured on (``trainer.infer_batch_size`` sequences)."""
    return eval_batches(corpus.val, cfg.model.block_size, cfg.trainer.infer_batch_size, 1)[0][0].to(device)


def evaluate_final(
    model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, env: DistEnv, run_dir: Path
) -> tuple[dict[str, float], dict[str, str]]:
    """prune → (recover) → quantize ``model`` in place as the config says, measuring it before and after.
    Returns the metrics and the tags (what the compression options chose, e.g. the int8 backend that ran).

    The trained model is saved as ``model.pt``, or, when compression follows, as ``uncompressed/model.pt``
    beside the compressed ``model.pt``.
    """
    t, device = cfg.trainer, env.device
    pruning, quantization = build_pruning(cfg), build_quantization(cfg)
    compressed = pruning.active or quantization.active
    batches = eval_batches(corpus.val, cfg.model.block_size, t.eval_batch_size, t.eval_batches)

    out: dict[str, float] = dict(quantization.reference(model))  # QAT-trained: the float model is the reference
    before = save_and_count(model, run_dir / (UNCOMPRESSED if compressed else FINAL))
    loss_before = evaluate(model, batches, cfg, device)
    after, loss, models = before, loss_before, {"final": model}
    if compressed:
        models["uncompressed"] = copy.deepcopy(model).eval()  # kept only to time it beside the compressed model
        recover = functools.partial(finetune_alone, corpus=corpus, device=device)  # the lever's recovery
        out.update(pruning.apply(model, corpus, cfg, device, finetune=recover))
        out.update(quantization.apply(model, cfg))
        after = save_and_count(model, run_dir / FINAL)
        out.update(pruning.accelerate(model, cfg))  # after saving: sparse kernels are how it runs, not what ships
        loss = evaluate(model, batches, cfg, device)

    seconds, tokens = inference_seconds(models, corpus, cfg, device)
    generation, lengths = generation_figures(models, corpus, cfg, device)
    out.update(generation)
    tags = {**quantization.tags, GENERATION_TAG: lengths}
    if cfg.get("serve") is not None and cfg.serve.enabled:
        serving, tags[SERVE_TAG] = serving_figures(models, corpus, cfg, device, run_dir)
        out.update(serving)
    out.update(quality_metrics(loss, loss_before, corpus))
    out.update(size_metrics(before, after, compressed))
    out.update(speed_metrics(seconds, tokens, compressed))
    return out, tags


def inference_seconds(models: dict[str, nn.Module], corpus: ByteCorpus, cfg: DictConfig,
                      device: torch.device) -> tuple[dict[str, float], int]:
    """Seconds per forward pass of each model on the inference batch, and the tokens in that batch."""
    batch = infer_batch(corpus, cfg, device)
    seconds = time_inference(models, batch, lambda: autocast(cfg, device), iters=cfg.trainer.infer_iters)
    return seconds, batch.numel()


def generation_figures(models: dict[str, nn.Module], corpus: ByteCorpus, cfg: DictConfig,
                       device: torch.device) -> tuple[dict[str, float], str]:
    """The generation metrics of each model (``trainer.gen_*``, within ``model.block_size``), and the
    lengths they were measured at, for the tag."""
    t = cfg.trainer
    prompt_len, new_tokens = generation_lengths(cfg)
    prompt = eval_batches(corpus.val, prompt_len, t.gen_batch_size, 1)[0][0].to(device)
    gen = time_generation(models, prompt, new_tokens, lambda: autocast(cfg, device), iters=t.gen_iters)
    lengths = f"prompt {prompt_len}, new tokens {new_tokens}, batch {t.gen_batch_size}"
    return generation_metrics(gen["final"], gen.get("uncompressed")), lengths


def serving_figures(models: dict[str, nn.Module], corpus: ByteCorpus, cfg: DictConfig, device: torch.device,
                    run_dir: Path) -> tuple[dict[str, float], str]:
    """The serving ladder of each model (``serve.*``) on the held-out text: its summary figures, and the tag that
    says how it was served. The per-rung figures go to ``<run dir>/serve_ladder.json`` for the launcher."""
    ladder = serve_ladder(models, corpus.val, cfg, device, lambda: autocast(cfg, device), autocast_dtype(cfg))
    if ladder is None:
        return {}, f"not served: {type(models['final']).__name__} has no batched KV-cache path"
    write_ladder(run_dir / LADDER_FILE, ladder, cfg)
    return ladder.summary, ladder.tag


def quality_metrics(loss: float, loss_before: float, corpus: ByteCorpus) -> dict[str, float]:
    """The validation loss after compression, in the units models compare in, and its change."""
    return {
        EVAL_LOSS: loss,
        "eval/perplexity": math.exp(loss),
        # nats per token / ln 2 / bytes per token: bits per byte of text, the scale on which models with
        # different vocabularies (and costlab's byte-level ones) compare
        EVAL_BITS_PER_BYTE: loss / math.log(2) / corpus.bytes_per_token,
        "eval/loss_uncompressed": loss_before,
        "eval/loss_delta": (loss - loss_before) / loss_before,
    }


def size_metrics(before: Saved, after: Saved, compressed: bool) -> dict[str, float]:
    """The model as shipped, and beside it, when compressed, what compression saved."""
    out = {
        MODEL_SIZE: after.size_bytes,
        "model/size_bytes_uncompressed": before.size_bytes,
        "model/params": after.params,
        "model/nonzero_params": after.nonzero_params,
        "model/sparsity": 1 - after.nonzero_params / after.params,
    }
    if compressed:  # figures of a comparison only where there was one
        out.update({
            "model/size_bytes_sparse": after.sparse_size_bytes,
            "model/size_ratio": before.size_bytes / after.size_bytes,
            "model/params_uncompressed": before.params,
        })
    return out


def speed_metrics(seconds: dict[str, float], tokens: int, compressed: bool) -> dict[str, float]:
    """Latency and throughput of the final model, and beside it, when compressed, of the uncompressed one."""
    out = {INFER_LATENCY: 1000 * seconds["final"], INFER_TOKENS_PER_S: tokens / seconds["final"]}
    if compressed:
        ref = seconds["uncompressed"]
        out.update({
            "infer/latency_ms_p50_uncompressed": 1000 * ref,
            "infer/tokens_per_s_uncompressed": tokens / ref,
            INFER_SPEEDUP: ref / seconds["final"],
        })
    return out
