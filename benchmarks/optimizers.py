"""What each ``optimizer`` option buys against AdamW: optimizer state, training speed and quality.

Every option trains the same model from the same initialisation on the same batches for the same steps, in
this one process, with costlab's own trainer (schedule, clipping); AdamW is the baseline measured in the same
run. Prints, per option: the optimizer state one rank holds (measured from its state tensors, and the memory
model's prediction beside it), its ratio to AdamW's, tokens/s after warm-up (the torchao options compile
their update in the first steps, which the warm-up leaves out) and its ratio, and the final eval loss and its
difference from AdamW's.

    python benchmarks/optimizers.py                              # llama_nano, 200 steps
    python benchmarks/optimizers.py --model gpt_micro --steps 300 --options adamw adamw_8bit
"""

from __future__ import annotations

import argparse
import platform

import torch
from omegaconf import open_dict

from costlab.data import build_corpus, eval_batches
from costlab.launcher.preflight import compose_config
from costlab.measure.machine import cpu_info
from costlab.measure.memory import PREDICTED, predict_state
from costlab.measure.names import MEM_OPTIMIZER
from costlab.models.gpt import build_model
from costlab.parallelism.core import DistEnv, Parallel
from costlab.training.optimizers import build_optimizer
from costlab.training.trainer import Trainer

OPTIONS = ["adamw", "adamw_8bit", "adamw_4bit", "adamw_bf16", "sgd"]


def train_one(model_name: str, option: str, steps: int, warmup: int, lr: float | None) -> dict[str, float]:
    overrides = [f"model={model_name}", f"optimizer={option}", "trainer.device=cpu"]
    if lr is not None:
        overrides.append(f"trainer.lr={lr}")
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.trainer.update(max_steps=steps, timing_warmup_steps=warmup, eval_interval=0, print_every=10**9)
    corpus = build_corpus(cfg.data)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model)
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"))
    parallel = Parallel(model=model)
    result = Trainer(parallel, build_optimizer(model, cfg), corpus, cfg, env).train()
    return {
        "state": result.state_bytes[MEM_OPTIMIZER],
        "predicted": predict_state(cfg, 1)[f"{PREDICTED}optimizer_bytes_per_rank"],
        "tokens_per_s": result.stats.summary()["perf/tokens_per_s"],
        "eval_loss": parallel.evaluate(eval_batches(corpus.val, cfg.model.block_size, cfg.trainer.eval_batch_size,
                                                    cfg.trainer.eval_batches), cfg),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_nano")
    ap.add_argument("--options", nargs="+", default=OPTIONS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sgd-lr", type=float, default=0.1, help="SGD's learning rate (AdamW's is the config's)")
    args = ap.parse_args()
    options = ["adamw", *[o for o in args.options if o != "adamw"]]
    rows = {o: train_one(args.model, o, args.steps, args.warmup, args.sgd_lr if o == "sgd" else None)
            for o in options}
    base = rows["adamw"]
    cpu = cpu_info()
    print(f"\nmodel={args.model} steps={args.steps} (warm-up {args.warmup} excluded from tokens/s) "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"machine: {cpu.model or platform.processor()} (features: {cpu.tags()['costlab.cpu.features']})\n")
    print("| optimizer | state per rank | predicted | state vs adamw | tokens/s | speed vs adamw | eval loss | "
          "loss vs adamw |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['state'] / 2**20:.3f} MiB | {r['predicted'] / 2**20:.3f} MiB | "
              f"{r['state'] / base['state']:.3f}x | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['eval_loss']:.4f} | "
              f"{100 * (r['eval_loss'] / base['eval_loss'] - 1):+.2f} % |")


if __name__ == "__main__":
    main()
