"""Receipts for the memory and time models: real ``run.py`` jobs on this machine (real torchrun ranks, gloo), each
one's predicted per-rank bytes and tokens/s against what it measured.

    python benchmarks/predictions.py                 # every configuration below (53 runs, ~15 min on 2 cores)
    python benchmarks/predictions.py --only hf       # the configurations whose name contains "hf"
    python benchmarks/predictions.py --repeat 3      # each configuration 3 times: its spread, and medians
    python benchmarks/predictions.py --plan          # and each one's plan on this CPU (mode=plan hardware=cpu)

For each configuration it prints the measured and predicted activation bytes held for backward
(``mem/activations_bytes_per_rank`` beside ``mem/predicted_activations_bytes_per_rank``) and the measured and
predicted state (parameters + gradients + optimizer state per rank), then the median and 95th-percentile
relative error of each over every configuration; then the measured and predicted training tokens/s
(``perf/tokens_per_s`` beside ``perf/predicted_tokens_per_s``), their errors, and Kendall's tau between the two
rankings. Run it alone: it starts up to four ranks on the machine's cores, and tokens/s is timed. With
``--repeat N`` each configuration runs N times: it prints how far its measured and its predicted tokens/s moved
between the runs (on a shared 2-core host, the measurement alone moves tens of percent), and the summary takes
each configuration's median error and median tokens/s. With ``--plan`` each configuration is also planned on this
CPU after its runs (``mode=plan hardware=cpu``: its probes in one process, no peers; the link is what the runs of as
many ranks here kept), and the plan's tokens/s (``plan/tokens_per_s``) is compared with the measured median the
same way.

The peak: on CPU a run reads glibc's allocator after every op of a warm-up step, its second
(``costlab.measure.allocator``), and the most it held beyond what it held as the step began
(``mem/step_allocated_bytes_per_rank``) is printed beside the memory model's counterpart
(``mem/predicted_step_allocated_bytes_per_rank``: the predicted peak less the parameters and optimizer state, and
DDP's gradients, which its buckets hold before the step). The tiny models' steps allocate a megabyte or two, where
the allocator's own and the autograd graph's bytes weigh; the ``peak`` configurations (``--only peak``) are sized
for their tensors to dominate (an 11M-parameter model with a 32k vocabulary, whose tied embedding outweighs its
blocks, and a 13M one whose blocks outweigh its byte embedding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from costlab.measure.machine import cpu_info  # noqa: E402
from tests.conftest import TINY, Cli  # noqa: E402

SMALL = [o for o in TINY if not o.startswith(("model.", "trainer.max_steps"))]
GPT = ["model.n_layer=4", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
MICRO = ["model=gpt_micro", "model.block_size=64", "trainer.batch_size=4"]
LLAMA = ["model=llama_nano", "model.n_layer=4", "model.block_size=32"]
HF = ["model=hf", "model.config=llama_tiny", "model.block_size=32"]
GPT2 = ["model=hf", "model.config=gpt2_tiny", "model.block_size=32"]
NEOX = ["model=hf", "model.config=neox_tiny", "model.block_size=32"]
QWEN3 = ["model=hf", "model.config=qwen3_tiny", "model.block_size=32"]
ROOT_HEAVY = ["model.vocab_size=32000", "model.n_embd=256", "model.n_layer=4", "model.n_head=4", "model.block_size=64",
              "trainer.batch_size=4"]
BLOCK_HEAVY = ["model.vocab_size=256", "model.n_embd=512", "model.n_layer=4", "model.n_head=8", "model.block_size=32",
               "trainer.batch_size=2"]

CONFIGS: dict[str, list[str]] = {
    "gpt single fp32": [*GPT, "parallelism=single"],
    "gpt single bf16": [*GPT, "parallelism=single", "precision=bf16"],
    "gpt ddp": [*GPT, "parallelism=ddp"],
    "gpt fsdp": [*GPT, "parallelism=fsdp"],
    "gpt fsdp bf16": [*GPT, "parallelism=fsdp", "precision=bf16"],
    "gpt fsdp bf16 full-ckpt accum2": [*GPT, "parallelism=fsdp", "precision=bf16",
                                       "trainer.activation_checkpointing=full", "trainer.grad_accum_steps=2"],
    "gpt tp": [*GPT, "parallelism=tp"],
    "gpt tp selective": [*GPT, "parallelism=tp", "trainer.activation_checkpointing=selective"],
    "gpt fsdp_tp (4 ranks)": [*GPT, "parallelism=fsdp_tp"],
    "gpt fsdp_tp bf16 (4 ranks)": [*GPT, "parallelism=fsdp_tp", "precision=bf16"],
    "gpt hsdp (4 ranks)": [*GPT, "parallelism=hsdp"],
    "gpt pp gpipe": [*GPT, "parallelism=pp", "parallelism.schedule=gpipe"],
    "gpt pp 1f1b": [*GPT, "parallelism=pp", "parallelism.schedule=1f1b"],
    "gpt pp interleaved": [*GPT, "parallelism=pp", "parallelism.schedule=interleaved_1f1b"],
    "gpt pp x fsdp (4 ranks)": [*GPT, "parallelism=pp", "trainer.nproc_per_node=4", "parallelism.pp_degree=2",
                                "parallelism.dp_shard=2", "parallelism.microbatches=2"],
    "gpt pp x tp (4 ranks)": [*GPT, "parallelism=pp", "trainer.nproc_per_node=4", "parallelism.pp_degree=2",
                              "parallelism.tp_degree=2"],
    "gpt_micro single": [*MICRO, "parallelism=single"],
    "gpt_micro ddp bf16": [*MICRO, "parallelism=ddp", "precision=bf16"],
    "gpt_micro fsdp full-ckpt": [*MICRO, "parallelism=fsdp", "trainer.activation_checkpointing=full"],
    "llama single selective": [*LLAMA, "parallelism=single", "trainer.activation_checkpointing=selective"],
    "llama ddp fp16": [*LLAMA, "parallelism=ddp", "precision=fp16"],
    "llama fsdp bf16": [*LLAMA, "parallelism=fsdp", "precision=bf16"],
    "hf llama single": [*HF, "parallelism=single"],
    "hf llama single bf16 accum2": [*HF, "parallelism=single", "precision=bf16", "trainer.grad_accum_steps=2"],
    "hf llama fsdp bf16 full-ckpt": [*HF, "parallelism=fsdp", "precision=bf16",
                                     "trainer.activation_checkpointing=full"],
    "hf llama tp": [*HF, "parallelism=tp"],
    "hf llama pp 1f1b": [*HF, "parallelism=pp"],
    "hf llama pp 1f1b bf16 selective": [*HF, "parallelism=pp", "precision=bf16",
                                        "trainer.activation_checkpointing=selective"],
    "hf llama ddp selective": [*HF, "parallelism=ddp", "trainer.activation_checkpointing=selective"],
    "hf gpt2 single": [*GPT2, "parallelism=single"],
    "hf gpt2 fsdp bf16": [*GPT2, "parallelism=fsdp", "precision=bf16"],
    "hf gpt2 pp 1f1b": [*GPT2, "parallelism=pp"],
    "hf gpt2 tp": [*GPT2, "parallelism=tp"],
    "hf gpt2 fsdp_tp bf16 (4 ranks)": [*GPT2, "parallelism=fsdp_tp", "precision=bf16"],
    "hf neox single": [*NEOX, "parallelism=single"],
    "hf neox pp 1f1b bf16": [*NEOX, "parallelism=pp", "precision=bf16"],
    "hf neox tp": [*NEOX, "parallelism=tp"],
    "hf qwen3 tp": [*QWEN3, "parallelism=tp"],
    "peak single root-heavy": [*ROOT_HEAVY, "parallelism=single"],
    "peak ddp root-heavy": [*ROOT_HEAVY, "parallelism=ddp"],
    "peak tp root-heavy": [*ROOT_HEAVY, "parallelism=tp"],
    "peak pp root-heavy": [*ROOT_HEAVY, "parallelism=pp"],
    "peak ddp root-heavy bf16 accum": [*ROOT_HEAVY, "parallelism=ddp", "precision=bf16", "trainer.grad_accum_steps=2"],
    "peak pp root-heavy bf16": [*ROOT_HEAVY, "parallelism=pp", "precision=bf16"],
    "peak fsdp root-heavy": [*ROOT_HEAVY, "parallelism=fsdp"],
    "peak fsdp root-heavy bf16": [*ROOT_HEAVY, "parallelism=fsdp", "precision=bf16"],
    "peak fsdp root-heavy untied bf16": [*ROOT_HEAVY, "parallelism=fsdp", "precision=bf16", "+model.tie_weights=false"],
    "peak fsdp block-heavy": [*BLOCK_HEAVY, "parallelism=fsdp"],
    "peak fsdp block-heavy bf16": [*BLOCK_HEAVY, "parallelism=fsdp", "precision=bf16"],
    "peak fsdp block-heavy unresharded": [*BLOCK_HEAVY, "parallelism=fsdp", "parallelism.reshard_after_forward=false"],
    "peak fsdp block-heavy full-ckpt": [*BLOCK_HEAVY, "parallelism=fsdp", "trainer.activation_checkpointing=full"],
    "gpt single lora": [*GPT, "parallelism=single", "finetune=lora"],
    "gpt ddp lora": [*GPT, "parallelism=ddp", "finetune=lora"],
    "gpt fsdp bf16 qlora": [*GPT, "parallelism=fsdp", "precision=bf16", "finetune=qlora"],
    "gpt_micro single qlora": [*MICRO, "parallelism=single", "finetune=qlora"],
    "hf llama single lora": [*HF, "parallelism=single", "finetune=lora"],
}

STATE = ("params", "grads", "optimizer")
TRANSIENTS = {"mem/predicted_loss_backward_bytes_per_rank": "loss/head backward",
              "mem/predicted_tied_gradient_bytes_per_rank": "tied gradient",
              "mem/predicted_gathered_bytes_per_rank": "FSDP gathered"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the configurations whose name contains this")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration")
    parser.add_argument("--plan", action="store_true", help="and plan each configuration on this CPU")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="costlab-predictions-"))
    cli = Cli(f"sqlite:///{root / 'mlflow.db'}", root)
    cpu = cpu_info()
    print(f"machine: {cpu.model}, {os.cpu_count()} cores, features {','.join(sorted(cpu.features)) or 'unknown'}",
          flush=True)
    print(f"{'configuration':34s} {'acts measured':>14s} {'predicted':>12s} {'error':>7s}   "
          f"{'state measured':>14s} {'predicted':>12s} {'error':>7s}", flush=True)
    errors: dict[str, list[float]] = {"activations": [], "state": [], "tokens/s": [], "step peak": []}
    speeds: list[tuple[str, float, float]] = []
    plans: list[tuple[str, float, float]] = []
    for name, overrides in CONFIGS.items():
        if args.only not in name:
            continue
        runs: list[tuple[float, ...]] = []
        for i in range(args.repeat):
            run_name = name.replace(" ", "-").replace("(", "").replace(")", "") + (f"-{i + 1}" if i else "")
            proc = cli(*SMALL, *overrides, f"trainer.max_steps={args.steps}", "serve.enabled=false",
                       "trainer.eval_interval=0", "trainer.timing_warmup_steps=5", f"tracking.run_name={run_name}",
                       timeout=900)
            if proc.returncode:
                print(f"{name:34s} FAILED: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            m = cli.run_by_name(run_name).data.metrics
            acts, acts_pred = m["mem/activations_bytes_per_rank"], m["mem/predicted_activations_bytes_per_rank"]
            state = sum(m[f"mem/{p}_bytes_per_rank"] for p in STATE)
            state_pred = sum(m[f"mem/predicted_{p}_bytes_per_rank"] for p in STATE)
            tps, tps_pred = m["perf/tokens_per_s"], m.get("perf/predicted_tokens_per_s", float("nan"))
            peak = m.get("mem/step_allocated_bytes_per_rank", float("nan"))
            peak_pred = m.get("mem/predicted_step_allocated_bytes_per_rank", float("nan"))
            runs.append((acts, acts_pred, state, state_pred, tps, tps_pred, peak, peak_pred))
            # the peak's transients: the prediction without each, against the measurement
            without = ", ".join(f"without {label} {(peak_pred - m[key]) / peak - 1:+.1%}"
                                for key, label in TRANSIENTS.items() if m.get(key))
            print(f"{name:34s} {acts:14,.0f} {acts_pred:12,.0f} {acts_pred / acts - 1:+7.1%}   "
                  f"{state:14,.0f} {state_pred:12,.0f} {state_pred / state - 1:+7.1%}   "
                  f"tokens/s {tps:9,.0f} predicted {tps_pred:9,.0f} {tps_pred / tps - 1:+7.1%}   "
                  f"step peak {peak:13,.0f} predicted {peak_pred:13,.0f} {peak_pred / peak - 1:+7.1%}"
                  + (f" ({without})" if without and peak == peak else ""), flush=True)
        if not runs:
            continue
        for part, (measured, predicted) in (("activations", (0, 1)), ("state", (2, 3)), ("tokens/s", (4, 5)),
                                            ("step peak", (6, 7))):
            if all(r[measured] == r[measured] for r in runs):  # not NaN: measured (the step peak: on CPU, glibc)
                errors[part].append(statistics.median(r[predicted] / r[measured] - 1 for r in runs))
        speeds.append((name, statistics.median(r[4] for r in runs), statistics.median(r[5] for r in runs)))
        if len(runs) > 1:
            print(f"{'':34s} over {len(runs)} runs: tokens/s measured {spread([r[4] for r in runs])}, predicted "
                  f"{spread([r[5] for r in runs])}, median error {errors['tokens/s'][-1]:+.1%}", flush=True)
        if args.plan:
            plan_name = name.replace(" ", "-").replace("(", "").replace(")", "") + "-plan"
            proc = cli(*SMALL, *overrides, f"trainer.max_steps={args.steps}", "mode=plan", "hardware=cpu",
                       f"tracking.run_name={plan_name}", timeout=900)
            if proc.returncode:
                print(f"{name:34s} plan FAILED: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            planned = cli.run_by_name(plan_name).data.metrics["plan/tokens_per_s"]
            plans.append((name, speeds[-1][1], planned))
            print(f"{'':34s} planned on this CPU {planned:9,.0f} tokens/s, {planned / speeds[-1][1] - 1:+7.1%} "
                  "against the measured", flush=True)
    if plans:
        errors["tokens/s planned"] = [planned / measured - 1 for _, measured, planned in plans]
    for part, errs in errors.items():
        if errs:
            absolute = sorted(abs(e) for e in errs)
            p95 = absolute[min(len(absolute) - 1, round(0.95 * (len(absolute) - 1)))]
            print(f"{part}: {len(errs)} configurations, median |error| {statistics.median(absolute):.2%}, "
                  f"95th percentile {p95:.2%}, worst {absolute[-1]:.2%}")
    if len(speeds) > 1:
        print(f"Kendall's tau between measured and predicted tokens/s rankings: {kendall_tau(speeds):.2f}")
    if len(plans) > 1:
        print(f"Kendall's tau between measured and planned tokens/s rankings: {kendall_tau(plans):.2f}")


def spread(values: list[float]) -> str:
    """The lowest and highest of ``values`` and how far the highest is above the lowest."""
    return f"{min(values):,.0f}-{max(values):,.0f} (+{max(values) / min(values) - 1:.0%})"


def kendall_tau(rows: list[tuple[str, float, float]]) -> float:
    """Kendall's tau-a of (measured, predicted) pairs: concordant minus discordant pairs over all pairs."""
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]
    score = sum((a[1] - b[1]) * (a[2] - b[2]) > 0 for a, b in pairs) - sum(
        (a[1] - b[1]) * (a[2] - b[2]) < 0 for a, b in pairs)
    return score / len(pairs)


if __name__ == "__main__":
    main()
