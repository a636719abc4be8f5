"""After training, on rank 0: measure the model, compress it, and measure it again.

prune → (recover) → quantize, with quality, size and speed measured before and after in the same
process on the same batches, so every delta is a measurement.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from costlab import pruning, quantization
from costlab.checkpoint import CHECKPOINT_TAG, FINAL, UNCOMPRESSED
from costlab.data import ByteCorpus, eval_batches
from costlab.metrics import count_params, inference_speed, now, save_model
from costlab.parallelism import DistEnv
from costlab.precision import autocast
from costlab.train import evaluate


def evaluate_final(model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, env: DistEnv, run_dir: Path) -> dict:
    t = cfg.trainer
    device = env.device
    block = cfg.model.block_size
    batches = eval_batches(corpus.val, block, t.eval_batch_size, t.eval_batches)
    infer_batch = eval_batches(corpus.val, block, t.infer_batch_size, 1)[0][0].to(device)

    def ctx() -> AbstractContextManager:
        return autocast(cfg, device)

    out: dict[str, float] = {}
    compressed = pruning.is_active(cfg) or quantization.is_active(cfg)
    if not compressed:
        loss_before = evaluate(model, batches, cfg, device)
        size = save_model(model, run_dir / FINAL)
        record_checkpoint(cfg, run_dir / FINAL)
        params, nonzero = count_params(model)
        out.update(inference_speed(model, infer_batch, ctx, iters=t.infer_iters))
        out.update({
            "eval/loss": loss_before,
            "eval/loss_uncompressed": loss_before,
            "eval/loss_delta": 0.0,
            "model/size_bytes": size,
            "model/size_bytes_uncompressed": size,
            "model/params": params,
            "model/nonzero_params": nonzero,
            "model/sparsity": 1 - nonzero / params,
        })
    else:
        if quantization.strip_fake_quant(model):  # QAT-trained: the float model is the reference
            out["quantization/qat_steps"] = cfg.quantization.qat_steps
        loss_before = evaluate(model, batches, cfg, device)
        size_before = save_model(model, run_dir / UNCOMPRESSED)
        record_checkpoint(cfg, run_dir / UNCOMPRESSED)  # what trainer.init_from=<this run> starts from
        params_before = count_params(model)[0]
        reference = copy.deepcopy(model).eval()  # kept only to time it beside the compressed model
        out.update(compress(model, corpus, cfg, device))
        size = save_model(model, run_dir / FINAL)
        size_sparse = size - sparse_savings(model.state_dict())
        params, nonzero = count_params(model)
        if cfg.pruning.name == "semi_structured":  # 0 when only masks were asked for: no speed-up claimed
            out["pruning/sparse_kernel_layers"] = pruning.accelerate(model, cfg)
        loss = evaluate(model, batches, cfg, device)
        out.update(compare_speed(reference, model, infer_batch, ctx, iters=t.infer_iters))
        out.update({
            "eval/loss": loss,
            "eval/loss_uncompressed": loss_before,
            "eval/loss_delta": (loss - loss_before) / loss_before,
            "model/size_bytes": size,
            "model/size_bytes_uncompressed": size_before,
            "model/size_bytes_sparse": size_sparse,
            "model/size_ratio": size_before / size,
            "model/params": params,
            "model/params_uncompressed": params_before,
            "model/nonzero_params": nonzero,
            "model/sparsity": 1 - nonzero / params,
        })
    out["eval/perplexity"] = math.exp(out["eval/loss"])
    return out


def compress(model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, device: torch.device) -> dict[str, float]:
    """prune → (recover) → quantize, in place, in the order DESIGN.md gives; returns what each did."""
    out: dict[str, float] = {}
    if pruning.is_active(cfg):
        out.update(pruning.apply(model, corpus, cfg, device))
    if quantization.is_active(cfg):
        out.update(quantization.apply(model, cfg))
    return out


def record_checkpoint(cfg: DictConfig, path: Path) -> None:
    """Tag the MLflow run with its trained model file, so ``trainer.init_from=<run id>`` finds it."""
    runtime = cfg.get("runtime")
    if runtime is None or not runtime.get("run_id"):
        return  # called outside a launched run (tests, benchmarks)
    from costlab.tracking import client

    client(cfg.tracking.uri).set_tag(runtime.run_id, CHECKPOINT_TAG, str(path.resolve()))


# --- measurements that understand quantized and sparse weights ------------------------------------------


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a state-dict entry is stored as (a torchao tensor: its data and scales)."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t.detach()]
    names, _ = t.__tensor_flatten__()
    return [leaf for n in names if (x := getattr(t, n)) is not None for leaf in _leaves(x)]


def _nonzero(t: torch.Tensor) -> int:
    try:
        return int(torch.count_nonzero(t))
    except (RuntimeError, NotImplementedError):  # float8 and other byte types without the kernel
        return int(torch.count_nonzero(t.view(torch.uint8)))


def sparse_savings(state: dict[str, torch.Tensor]) -> int:
    """Bytes a sparse encoding would save over the dense file: each stored tensor kept as its non-zero
    values plus a 1-bit-per-element presence mask, where that is smaller (for 2:4, this equals the
    values plus 2-bit indices). Tied tensors are counted once, as ``torch.save`` stores them."""
    seen, saved = set(), 0
    for t in state.values():
        for leaf in _leaves(t):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset(), leaf.numel())
            if key in seen or leaf.numel() == 0:
                continue
            seen.add(key)
            dense = leaf.numel() * leaf.element_size()
            sparse = _nonzero(leaf) * leaf.element_size() + math.ceil(leaf.numel() / 8)
            saved += max(0, dense - sparse)
    return saved


@torch.inference_mode()
def compare_speed(
    reference: nn.Module,
    model: nn.Module,
    batch: torch.Tensor,
    autocast: Callable[[], AbstractContextManager],
    warmup: int = 3,
    iters: int = 10,
) -> dict[str, float]:
    """Forward passes of both models on one batch, interleaved so that load from elsewhere on the
    machine falls on both alike; medians after warm-up, and the speed-up as their ratio."""
    reference.eval()
    model.eval()
    device = batch.device
    times: dict[str, list[float]] = {"ref": [], "new": []}
    for i in range(warmup + iters):
        order = (("ref", reference), ("new", model)) if i % 2 else (("new", model), ("ref", reference))
        for key, m in order:
            t0 = now(device)
            with autocast():
                m(batch)
            t1 = now(device)
            if i >= warmup:
                times[key].append(t1 - t0)
    ref, new = statistics.median(times["ref"]), statistics.median(times["new"])
    return {
        "infer/latency_ms_p50": 1000 * new,
        "infer/tokens_per_s": batch.numel() / new,
        "infer/latency_ms_p50_uncompressed": 1000 * ref,
        "infer/tokens_per_s_uncompressed": batch.numel() / ref,
        "infer/speedup": ref / new,
    }


# --- loading what was saved -------------------------------------------------------------------------


def load_model(model_cfg: DictConfig, path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved (possibly pruned and quantized) model: layers a structured prune shrank are
    resized to the file's shapes, and torchao tensors are loaded as they were saved."""
    from costlab.model import build_model

    try:
        import torchao.quantization  # noqa: F401  (allow-lists torchao's tensor types for weights_only)
    except ImportError:
        pass
    state = torch.load(path, map_location=device, weights_only=True)
    model = build_model(model_cfg)
    for name, m in list(model.named_modules()):
        w = state.get(f"{name}.weight")
        if isinstance(m, nn.Linear) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            parent, _, attr = name.rpartition(".")
            small = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
            setattr(model.get_submodule(parent) if parent else model, attr, small)
    model.load_state_dict(state, assign=True)
    model.to(device)
    head, emb = state.get("lm_head.weight"), state.get("wte.weight")
    if head is not None and emb is not None and type(head) is torch.Tensor and type(emb) is torch.Tensor:
        if head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr():
            model.lm_head.weight = model.wte.weight  # torch.save kept the tie; assign=True broke it
    return model.eval()
