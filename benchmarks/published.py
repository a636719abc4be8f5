"""Published GPU training runs predicted by ``mode=plan``'s time and memory models, beside their published figures.

    python benchmarks/published.py            # every row of benchmarks/published_runs.csv (~2 min on 2 cores)
    python benchmarks/published.py --fit      # fit the GPU efficiencies on llm-foundry's A100 80GB table alone

The runs (``published_runs.csv``, transcribed digit for digit):

- llm-foundry's ``scripts/train/benchmarking/README.md`` (mosaicml/llm-foundry at 061f2c7): MPT models from 125M to
  70B parameters, FSDP FULL_SHARD over 8 to 128 GPUs, bf16, with and without activation checkpointing, sequences
  of 512 to 65536 tokens; tokens/s per GPU and MFU, no memory. Tables: H100 80GB, A100 80GB, A100 40GB.
- torchtitan's ``benchmarks/llama3_h100_202412_torchtitan.md``: Llama 3.1 8B under FSDP on 8 and 128 H100s (96 GB
  HBM2e, 2.4 TB/s, 500 W), selective checkpointing, without torch.compile or Float8; tokens/s per GPU and memory.

MPT is costlab's GPT with MPT's shapes (LayerNorm, GELU MLP 4x, no biases, tied embeddings, vocabulary 50368; a
learned position table stands in for ALiBi, +0.1 % parameters); Llama 3.1 8B is ``conf/hf_configs/llama3_8b.json``
through ``transformers``. Each row becomes the ``run.py`` overrides a user would plan it with (``parallelism=fsdp``
over every GPU, ``precision=bf16``, the global batch and gradient accumulation of the row) and is predicted by the
same functions ``mode=plan`` calls. The efficiencies (:data:`costlab.measure.cardrates.GPU_CALIBRATION`) are fitted on
the A100 80GB rows only; every other row is a check the fit never saw. Prints the median and 95th percentile of
|error| per table, and for torchtitan's rows the predicted peak memory against the published one (less the
matmul outputs torchtitan's selective checkpointing recomputes and costlab's keeps: :func:`titan_selective_saving`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from costlab import quiet_third_party_notes  # noqa: E402
from costlab.launcher.plan import TRACED_ROWS, allowance, predict_time  # noqa: E402
from costlab.launcher.preflight import compose_config  # noqa: E402
from costlab.measure import cardrates  # noqa: E402
from costlab.measure.memory import predict_state  # noqa: E402
from costlab.models.hf_config import read_config  # noqa: E402

CSV = Path(__file__).with_name("published_runs.csv")
MPT = {  # llm-foundry's scripts/train/yamls/pretrain/mpt-*.yaml: (n_layers, n_heads, d_model)
    "125m": (12, 12, 768), "350m": (24, 16, 1024), "760m": (24, 12, 1536), "1b": (24, 16, 2048),
    "3b": (32, 20, 2560), "7b": (32, 32, 4096), "13b": (40, 40, 5120), "30b": (48, 56, 7168), "70b": (80, 64, 8192),
}
HARDWARE = {"a100_80gb": ["hardware=a100_80gb"], "a100_40gb": ["hardware=a100_40gb"],
            "h100_80gb": ["hardware=h100_sxm"],
            # torchtitan's H100s: 96 GB of HBM2e at 2.4 TB/s (its benchmark's own words)
            "h100_96gb": ["hardware=h100_sxm", "hardware.memory_bandwidth_gbps=2400", "hardware.memory_gb=103"]}
CALIBRATION_TABLE = ("llm-foundry", "a100_80gb")
GIB = 2**30


def overrides(row: dict[str, str]) -> list[str]:
    gpus = int(row["gpus"])
    out = ["mode=plan", "parallelism=fsdp", "parallelism.dp_shard=-1", "precision=bf16",
           f"trainer.nnodes={max(1, gpus // 8)}", f"trainer.nproc_per_node={min(gpus, 8)}",
           f"trainer.batch_size={row['global_batch']}", f"trainer.grad_accum_steps={row['grad_accum']}",
           f"trainer.activation_checkpointing={row['activation_checkpointing']}", *HARDWARE[row["gpu"]]]
    if row["source"] == "torchtitan":
        return [*out, "model=hf", "model.config=llama3_8b", f"model.block_size={row['seq_len']}"]
    layers, heads, width = MPT[row["model"]]
    return [*out, "model=gpt_nano", f"model.name=mpt_{row['model']}", "model.vocab_size=50368",
            f"model.block_size={row['seq_len']}", f"model.n_layer={layers}", f"model.n_head={heads}",
            f"model.n_embd={width}"]


def load() -> list[tuple[dict[str, str], object]]:
    rows = list(csv.DictReader(CSV.open()))
    return [(row, compose_config(overrides(row))) for row in rows]


def predicted_per_gpu(cfg: object, row: dict[str, str], calibration: cardrates.GpuCalibration) -> float:
    gpus = int(row["gpus"])
    prediction, why = predict_time(cfg, gpus, TRACED_ROWS, calibration)
    if prediction is None:
        raise RuntimeError(why)
    return prediction.tokens_per_s / gpus


def log_error(predicted: float, published: float) -> float:
    return math.log(predicted / published)


def fit(table: list[tuple[dict[str, str], object]]) -> cardrates.GpuCalibration:
    """The (matmul, attention, memory, overlap cost) shares that minimise the squared log error over the calibration
    table's rows: a coarse grid, then finer ones around its best point."""
    rows = [(r, c) for r, c in table if (r["source"], r["gpu"]) == CALIBRATION_TABLE]
    base = cardrates.GPU_CALIBRATION

    def loss(point: tuple[float, ...]) -> float:
        c = replace(base, matmul=point[0], attention=point[1], memory=point[2], overlap_cost=point[3])
        return sum(log_error(predicted_per_gpu(cfg, r, c), float(r["tokens_per_s_per_gpu"])) ** 2 for r, cfg in rows)

    lowest = (0.05, 0.05, 0.05, 0.0)  # a perfect overlap costs nothing; a rate is never zero
    best = min(itertools.product((0.6, 0.7, 0.8, 0.9, 1.0), (0.3, 0.45, 0.6, 0.75, 0.9), (0.3, 0.5, 0.7, 0.9),
                                 (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)), key=loss)
    for step in (0.05, 0.02):
        grid = [tuple(min(1.0, max(low, v + d * step)) for v, d, low in zip(best, ds, lowest, strict=True))
                for ds in itertools.product((-1, 0, 1), repeat=4)]
        best = min(grid, key=loss)
    return replace(base, matmul=round(best[0], 3), attention=round(best[1], 3), memory=round(best[2], 3),
                   overlap_cost=round(best[3], 3))


def titan_selective_saving(cfg: object, row: dict[str, str]) -> float:
    """Bytes per GPU that torchtitan's selective checkpointing does not keep and costlab's does: costlab's policy
    keeps every matmul's output, torchtitan's ``op`` policy (``selective_ac_option = 'op'``) recomputes every
    second matmul of a block, which in its Llama's order are ``wk``, ``wo`` and ``w3``: their bf16 outputs, per token
    and layer. Computed from the shapes (nothing fitted), so that torchtitan's published memory is compared with
    the prediction for the same policy."""
    if row["source"] != "torchtitan" or row["activation_checkpointing"] != "selective":
        return 0.0
    hf = read_config(cfg.model)
    kv = hf["num_key_value_heads"] * hf["hidden_size"] // hf["num_attention_heads"]
    per_token_layer = 2 * (kv + hf["hidden_size"] + hf["intermediate_size"])  # wk, wo, w3 outputs in bf16
    tokens = int(row["micro_batch"]) * int(row["seq_len"])
    return tokens * hf["num_hidden_layers"] * per_token_layer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="fit the efficiencies on llm-foundry's A100 80GB rows")
    args = parser.parse_args()
    quiet_third_party_notes()
    table = load()
    calibration = cardrates.GPU_CALIBRATION
    if args.fit:
        calibration = fit(table)
        print(f"fitted on {CALIBRATION_TABLE}: {calibration}")
    errors: dict[tuple[str, str], list[float]] = {}
    print(f"{'source':12} {'gpu':10} {'model':12} {'seq':>6} {'gpus':>4} {'mb':>3} {'ac':9} "
          f"{'published':>10} {'predicted':>10} {'error':>7}")
    memory_lines = []
    for row, cfg in table:
        published = float(row["tokens_per_s_per_gpu"])
        predicted = predicted_per_gpu(cfg, row, calibration)
        error = predicted / published - 1
        errors.setdefault((row["source"], row["gpu"]), []).append(abs(error))
        print(f"{row['source']:12} {row['gpu']:10} {row['model']:12} {row['seq_len']:>6} {row['gpus']:>4} "
              f"{row['micro_batch']:>3} {row['activation_checkpointing']:9} {published:>10,.0f} {predicted:>10,.0f} "
              f"{error:>+7.1%}")
        if row["memory_gib"]:
            state = predict_state(cfg, int(row["gpus"]))
            total = sum(state.values()) - titan_selective_saving(cfg, row)
            total += allowance(total)
            memory_lines.append(f"{row['model']} on {row['gpus']} GPUs: published {float(row['memory_gib']):.1f} GiB,"
                                f" predicted {total / GIB:.1f} GiB ({total / GIB / float(row['memory_gib']) - 1:+.1%})")
    print("\ntokens/s per GPU, |error| by table (calibrated on " + " ".join(CALIBRATION_TABLE) + " only):")
    for (source, gpu), values in errors.items():
        role = "calibration" if (source, gpu) == CALIBRATION_TABLE else "check"
        print(f"  {source:12} {gpu:10} {role:12} n={len(values):3}  median {statistics.median(values):6.1%}  "
              f"p95 {percentile(values, 0.95):6.1%}  within 25 %: {sum(v <= 0.25 for v in values)}")
    if memory_lines:
        print("peak memory (torchtitan publishes its reserved memory; predicted less what its selective "
              "checkpointing recomputes and costlab's keeps):")
        print("\n".join(f"  {line}" for line in memory_lines))


if __name__ == "__main__":
    main()
