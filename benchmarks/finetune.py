"""What LoRA, QLoRA and the low-bit optimizers buy when fine-tuning: trainable parameters, training state, speed
and quality, against full fine-tuning with AdamW from the same start.

A base model is trained first (full, AdamW); every variant then fine-tunes a copy of it for the same steps on
the same batches, in this one process, with costlab's trainer: full fine-tuning with AdamW is the baseline
measured in the same run. Prints, per variant: trainable parameters (and their share), the training state one
rank holds (parameters + gradients + optimizer state, measured from the tensors) and its ratio to the
baseline's, the optimizer state alone, the bytes the adapted Linears' frozen weights take against their fp32
bytes (QLoRA: NF4, by each backend), tokens/s after warm-up and its ratio, and the eval loss after the
fine-tune and its difference from the baseline's (QLoRA: and from LoRA's).

    python benchmarks/finetune.py                                          # llama_small (Hugging Face)
    python benchmarks/finetune.py --targets q_proj v_proj --base-steps 200 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import importlib.util

import torch
from omegaconf import open_dict

from costlab.data import build_corpus, eval_batches
from costlab.data.tokens import load_codec, tokenize_corpus
from costlab.launcher.preflight import compose_config
from costlab.measure.machine import cpu_info
from costlab.measure.metrics import local_bytes
from costlab.measure.names import MEM_GRADS, MEM_OPTIMIZER, MEM_PARAMS
from costlab.models.adapters import apply_finetune, trainable_params
from costlab.models.gpt import build_model
from costlab.parallelism.core import DistEnv, Parallel
from costlab.training.optimizers import build_optimizer
from costlab.training.trainer import Trainer

VARIANTS = [("full", "adamw", None), ("full", "adamw_8bit", None), ("lora", "adamw", None),
            ("lora", "adamw_8bit", None), ("qlora", "adamw", "torchao"), ("qlora", "adamw", "bitsandbytes"),
            ("qlora", "adamw_8bit", "torchao")]


def configure(args: argparse.Namespace, finetune: str, optimizer: str, steps: int, lr: float,
              backend: str | None = None):
    overrides = [*args.model, f"finetune={finetune}", f"optimizer={optimizer}", "trainer.device=cpu"]
    if finetune != "full":
        overrides.append(f"finetune.rank={args.rank}")
    if backend:
        overrides.append(f"finetune.backend={backend}")
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.trainer.update(max_steps=steps, timing_warmup_steps=args.warmup, eval_interval=0, print_every=10**9,
                           batch_size=args.batch, lr=lr, warmup_steps=min(10, steps // 5))
        if finetune != "full" and args.targets:
            cfg.finetune.targets = list(args.targets)
    return cfg


def train(model: torch.nn.Module, cfg, corpus) -> tuple[dict[str, float], float]:
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"))
    parallel = Parallel(model=model)
    result = Trainer(parallel, build_optimizer(model, cfg), corpus, cfg, env).train()
    val = eval_batches(corpus.val, cfg.model.block_size, cfg.trainer.eval_batch_size, cfg.trainer.eval_batches)
    return {**result.state_bytes, "tokens_per_s": result.stats.summary()["perf/tokens_per_s"],
            "eval_loss": parallel.evaluate(val, cfg)}, result.final_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["model=hf", "model.config=llama_small"])
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="*", default=None, help="LoRA's target_modules (default: the option's)")
    ap.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning's learning rate")
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    args = ap.parse_args()

    base_cfg = configure(args, "full", "adamw", args.base_steps, 3e-3)
    corpus = tokenize_corpus(build_corpus(base_cfg.data), load_codec(base_cfg.model))
    torch.manual_seed(base_cfg.trainer.seed)
    base = build_model(base_cfg.model)
    train(base, base_cfg, corpus)
    dense = dict(base.named_parameters())
    rows = {}
    for finetune, optimizer, backend in VARIANTS:
        if backend == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
            continue
        cfg = configure(args, finetune, optimizer, args.steps, args.lr if finetune == "full" else args.lora_lr,
                        backend)
        torch.manual_seed(cfg.trainer.seed)
        model = apply_finetune(copy.deepcopy(base), cfg)
        frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()
                  if n.endswith("base_layer.weight")}
        figures, _ = train(model, cfg, corpus)
        figures["trainable"] = trainable_params(model)
        figures["params"] = sum(p.numel() for p in dense.values())
        figures["base_ratio"] = (sum(local_bytes(p) for p in frozen.values())
                                 / sum(4 * dense[n].numel() for n in frozen)) if frozen else None
        rows[f"{finetune} {optimizer}" + (f" ({backend})" if backend else "")] = figures
    ref = rows["full adamw"]
    lora = rows.get("lora adamw")

    def state(r: dict[str, float]) -> float:
        return r[MEM_PARAMS] + r[MEM_GRADS] + r[MEM_OPTIMIZER]

    cpu = cpu_info()
    print(f"\nmodel={' '.join(args.model)} base {args.base_steps} steps, then {args.steps} fine-tuning steps "
          f"(batch {args.batch}, warm-up {args.warmup} excluded from tokens/s); LoRA rank {args.rank}, targets "
          f"{args.targets or 'the option default'}; threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"machine: {cpu.model} (features: {cpu.tags()['costlab.cpu.features']})\n")
    trainable, total = share_at_scale(args.rank, args.targets)
    print(f"LoRA rank {args.rank} at Llama-3.2-1B's shapes (built on the meta device, counted): {trainable:,} of "
          f"{total:,} parameters train ({100 * trainable / total:.2f} %)\n")
    print("| variant | trainable | training state | vs full adamw | optimizer state | adapted weights vs fp32 | "
          "tokens/s | vs full adamw | eval loss | vs full adamw | vs lora adamw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base_ratio = f"{r['base_ratio']:.3f}x" if r["base_ratio"] is not None else "-"
        vs_lora = f"{100 * (r['eval_loss'] / lora['eval_loss'] - 1):+.2f} %" if lora and "lora" in name else "-"
        print(f"| {name} | {r['trainable']:,} ({100 * r['trainable'] / r['params']:.2f} %) | "
              f"{state(r) / 2**20:.2f} MiB | {state(r) / state(ref):.3f}x | {r[MEM_OPTIMIZER] / 2**20:.2f} MiB | "
              f"{base_ratio} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | "
              f"{r['eval_loss']:.4f} | {100 * (r['eval_loss'] / ref['eval_loss'] - 1):+.2f} % | {vs_lora} |")


# Llama-3.2-1B's shapes (its config.json), for the trainable share at a deployed model's widths
LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True}


def share_at_scale(rank: int, targets: list[str] | None) -> tuple[int, int]:
    """(trainable, total) parameters of LoRA at ``rank`` on a model of Llama-3.2-1B's shapes, built on the meta
    device (no memory, no weights) and counted, the adapters injected by the same code as a run's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = compose_config(["model=hf", "finetune=lora", f"finetune.rank={rank}"])
    if targets:
        with open_dict(cfg):
            cfg.finetune.targets = list(targets)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B))
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        model = apply_finetune(model, cfg)
    return trainable_params(model), total


if __name__ == "__main__":
    main()
