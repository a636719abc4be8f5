"""After training, on rank 0: measure the model, compress it, and measure it again.

prune → (recover) → quantize, with quality, size and speed measured before and after in the same
process on the same batches, so every delta is a measurement.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from costlab import pruning, quantization
from costlab.data import ByteCorpus, eval_batches
from costlab.metrics import count_params, inference_speed, save_model
from costlab.parallelism import DistEnv
from costlab.precision import autocast
from costlab.train import evaluate


def evaluate_final(model: nn.Module, corpus: ByteCorpus, cfg: DictConfig, env: DistEnv, run_dir: Path) -> dict:
    t = cfg.trainer
    device = env.device
    block = cfg.model.block_size
    batches = eval_batches(corpus.val, block, t.eval_batch_size, t.eval_batches)
    infer_batch = eval_batches(corpus.val, block, t.infer_batch_size, 1)[0][0].to(device)

    def speed(m: nn.Module) -> dict[str, float]:
        return inference_speed(m, infer_batch, lambda: autocast(cfg, device), iters=t.infer_iters)

    out: dict[str, float] = {}
    loss_before = evaluate(model, batches, cfg, device)
    compressed = pruning.is_active(cfg) or quantization.is_active(cfg)
    if not compressed:
        size = save_model(model, run_dir / "model.pt")
        params, nonzero = count_params(model)
        out.update(speed(model))
        out.update({
            "eval/loss": loss_before,
            "eval/loss_uncompressed": loss_before,
            "model/size_bytes": size,
            "model/size_bytes_uncompressed": size,
            "model/params": params,
            "model/nonzero_params": nonzero,
            "model/sparsity": 1 - nonzero / params,
        })
    else:
        raise NotImplementedError("compression arrives with the pruning and quantization groups")
    out["eval/perplexity"] = float(torch.exp(torch.tensor(out["eval/loss"])))
    return out
