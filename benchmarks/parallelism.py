"""Throughput and per-rank memory of every ``parallelism`` option at 2 ranks on CPU, against ``single``,
measured in one run on one machine, printed as a table of ratios.

    python benchmarks/parallelism.py                  # gpt_nano, ~5 minutes on 2 cores
    python benchmarks/parallelism.py --steps 40 --batch 32 --extra trainer.activation_checkpointing=full

Every row is a real ``python run.py`` job (torchrun, gloo, a throwaway SQLite MLflow store); the
numbers are read back from MLflow, so they are exactly what a user's sweep would log.

What CPU numbers can say about GPUs
-----------------------------------
* Bytes per rank (parameters, gradients, optimizer state) are measured from the local shards and do
  not depend on the device: FSDP's 1/N, TP's 1/N of the split matrices, PP's 1/N of the blocks carry
  over to GPUs unchanged (plus any padding of uneven shards).
* Tokens/s here is an *overhead* measurement, not a speed-up: the 2 ranks share the same cores that
  ``single`` uses alone (each rank gets half the threads), so no option can beat ``single``. What the
  ratio shows is the price of each scheme's communication and bookkeeping on a tiny model.
* That price is exaggerated on CPU: gloo moves every collective through loopback TCP and memory
  copies on the same cores that compute, while NCCL over NVLink/InfiniBand runs on its own links and
  overlaps compute. FSDP's per-block all-gathers and TP's per-layer all-reduces suffer most here;
  on GPUs with real model sizes they hide mostly behind the matmuls.
* Pipeline bubbles look smaller on CPU than on GPUs: a rank waiting in the bubble frees its cores for
  the other rank. On GPUs an idle stage is an idle device.
* Peak memory on CPU is the process's peak RSS, dominated by the Python/torch runtime for tiny
  models; on GPUs ``mem/peak_bytes`` is ``max_memory_allocated``, dominated by activations and state.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPTIONS: list[tuple[str, list[str]]] = [
    ("single", ["parallelism=single"]),
    ("ddp", ["parallelism=ddp"]),
    ("fsdp", ["parallelism=fsdp"]),
    ("tp", ["parallelism=tp"]),
    ("pp gpipe", ["parallelism=pp", "parallelism.schedule=gpipe"]),
    ("pp 1f1b", ["parallelism=pp", "parallelism.schedule=1f1b"]),
    ("pp interleaved_1f1b", ["parallelism=pp", "parallelism.schedule=interleaved_1f1b"]),
]  # fsdp_tp needs 4 ranks: at 2 it would be dp_shard=1 x tp_degree=2, which is tp


def run_option(name: str, overrides: list[str], args: argparse.Namespace, store: Path) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    run_name = name.replace(" ", "-")
    cmd = [
        sys.executable, str(ROOT / "run.py"), *overrides,
        f"model={args.model}", "data=synthetic", f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch}",
        f"trainer.timing_warmup_steps={args.warmup}", "trainer.eval_interval=0", "trainer.eval_batches=2",
        "trainer.infer_iters=2", "trainer.device=cpu", "trainer.print_every=1000000",
        f"tracking.uri={uri}", "tracking.experiment_name=bench-parallelism", f"tracking.run_name={run_name}",
        f"hydra.run.dir={store / run_name}", *args.extra,
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-parallelism")
    run = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'")[0]
    metrics = dict(run.data.metrics)
    metrics["wall_s"] = time.time() - t0
    return metrics


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def table(results: dict[str, dict[str, float]]) -> str:
    base = results.get("single") or {}

    def ratio(m: dict, key: str) -> str:
        return f"{m[key] / base[key]:.2f}x" if base.get(key) and key in m else "-"

    head = ("| option | tokens/s | vs single | step p50 ms | params MiB/rank | grads MiB/rank | optim MiB/rank "
            "| state vs single | peak RSS MiB | final loss |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in results.items():
        if not m:
            lines.append(f"| {name} | failed |" + " |" * 8)
            continue
        state = sum(m.get(f"mem/{k}_bytes_per_rank", 0) for k in ("params", "grads", "optimizer"))
        base_state = sum(base.get(f"mem/{k}_bytes_per_rank", 0) for k in ("params", "grads", "optimizer"))
        lines.append(
            f"| {name} | {m['perf/tokens_per_s']:.0f} | {ratio(m, 'perf/tokens_per_s')} "
            f"| {m['perf/step_time_ms_p50']:.1f} | {mib(m['mem/params_bytes_per_rank'])} "
            f"| {mib(m['mem/grads_bytes_per_rank'])} | {mib(m['mem/optimizer_bytes_per_rank'])} "
            f"| {state / base_state:.2f}x | {mib(m['mem/peak_bytes'])} | {m['train/final_loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt_nano")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--only", nargs="*", help="option names to run (default: all)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every row")
    args = parser.parse_args(argv)

    options = [(n, o) for n, o in OPTIONS if not args.only or n in args.only or n == "single"]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="costlab-bench-") as tmp:
        for name, overrides in options:
            results[name] = run_option(name, overrides, args, Path(tmp))
            took = results[name].get("wall_s", float("nan"))
            print(f"  {name}: {took:.0f}s", file=sys.stderr, flush=True)
    print(f"\nmodel={args.model} data=synthetic steps={args.steps} (timed after {args.warmup}) "
          f"global batch={args.batch} device=cpu, 2 ranks except single\n")
    print(table(results))
    print("\nBytes per rank carry over to GPUs; tokens/s ratios are CPU overheads (the ranks share the cores"
          " single uses alone; gloo over loopback), not GPU speed-ups. See this script's docstring.")


if __name__ == "__main__":
    main()
