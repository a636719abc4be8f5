"""How much smaller, how much faster, how much worse: every compression option that runs on this machine,
applied to one trained gpt_micro, measured against the uncompressed model in this same process.

    python benchmarks/compression.py                       # train gpt_micro briefly, then compress it
    python benchmarks/compression.py --init-from RUN_DIR_OR_MODEL_FILE --batch 8 --iters 30
    python benchmarks/compression.py --model llama_small --steps 200 --train-batch 8   # a Llama-style model=hf

Every row runs costlab's own final step, ``costlab.training.evaluation.evaluate_final`` (the code a run executes).
Sizes are the bytes of the saved state dict; speed-ups come from interleaved forward passes of the
uncompressed and the compressed model on the same batch after warm-up (costlab.measure.metrics.time_inference);
decode speed-ups from interleaved greedy generations with a KV cache (costlab.measure.generation); loss deltas are
relative. ``--model`` takes a costlab model option or a shipped ``model=hf`` config (conf/hf_configs/).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from costlab import CONF_DIR  # noqa: E402
from costlab.data import build_corpus  # noqa: E402
from costlab.launcher.validate import validate  # noqa: E402
from costlab.measure.machine import cpu_info  # noqa: E402
from costlab.measure.metrics import count_params, save_model  # noqa: E402
from costlab.models.gpt import build_model  # noqa: E402
from costlab.models.hf_config import shipped_configs  # noqa: E402
from costlab.parallelism.core import DistEnv, Parallel  # noqa: E402
from costlab.quantization import build_quantization  # noqa: E402
from costlab.quantization.base import BACKEND_TAG  # noqa: E402
from costlab.tracking.find import resolve_init_from  # noqa: E402
from costlab.training.evaluation import evaluate_final  # noqa: E402
from costlab.training.optimizers import build_optimizer  # noqa: E402
from costlab.training.trainer import Trainer  # noqa: E402

OPTIONS: dict[str, list[str]] = {
    "l1_unstructured 0.5": ["pruning=l1_unstructured", "pruning.amount=0.5"],
    "random_unstructured 0.5": ["pruning=random_unstructured", "pruning.amount=0.5"],
    "ln_structured 0.3": ["pruning=ln_structured", "pruning.amount=0.3"],
    "wanda 0.5": ["pruning=wanda", "pruning.amount=0.5", "pruning.calibration_batches=4"],
    "semi_structured (mask only)": ["pruning=semi_structured", "pruning.allow_mask_only=true"],
    "structured 0.5": ["pruning=structured", "pruning.amount=0.5"],
    "int8_dynamic torchao": ["quantization=int8_dynamic", "quantization.backend=torchao"],
    "int8_dynamic pytorch": ["quantization=int8_dynamic", "quantization.backend=pytorch"],
    "int8_dynamic auto": ["quantization=int8_dynamic"],
    "int8_weight_only": ["quantization=int8_weight_only"],
    "qat_int8": ["quantization=qat_int8"],
    "structured 0.3 + int8_dynamic": ["pruning=structured", "pruning.amount=0.3", "quantization=int8_dynamic"],
    "structured 0.5 + int8_dynamic": ["pruning=structured", "pruning.amount=0.5", "quantization=int8_dynamic"],
    "wanda 0.5 + int8_dynamic": ["pruning=wanda", "pruning.calibration_batches=4", "quantization=int8_dynamic"],
}
# the goals of the compression issue, on this machine: (option, smaller at least, faster at least, loss delta at most)
GOALS = [("int8_dynamic auto", 3.5, 1.5, 0.02), ("structured 0.5", 1.3, 1.3, None)]
AUTO_SLACK = 1.10  # auto may be at most 10 % slower than the faster fixed backend


def model_overrides(name: str) -> list[str]:
    return ["model=hf", f"model.config={name}"] if name in shipped_configs() else [f"model={name}"]


def config(args: argparse.Namespace, extra: list[str]):
    overrides = [
        *model_overrides(args.model), "trainer.device=cpu", f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.train_batch}", f"trainer.eval_batch_size={args.eval_batch}",
        f"trainer.eval_batches={args.eval_batches}", f"trainer.infer_batch_size={args.batch}",
        f"trainer.infer_iters={args.iters}",
        f"quantization.qat_steps={args.qat_steps}" if "quantization=qat_int8" in extra else None, *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [o for o in overrides if o])
    validate(cfg)
    return cfg


def fit(model, corpus, cfg, env, hooks=()) -> None:
    Trainer(Parallel(model=model), build_optimizer(model, cfg), corpus, cfg, env, step_hooks=hooks).train()
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt_micro", help="a model option, or a model=hf config name "
                    f"({', '.join(shipped_configs())})")
    ap.add_argument("--init-from", help="a saved model of --model (model file, run folder); default: train one here")
    ap.add_argument("--steps", type=int, default=150, help="training steps when not --init-from")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--qat-steps", type=int, default=20, help="fine-tuning steps with fake quantization")
    ap.add_argument("--batch", type=int, default=8, help="inference batch (sequences of 128 bytes)")
    ap.add_argument("--iters", type=int, default=20, help="timed forward passes per model, after 3 warm-up")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="a subset of the option names")
    args = ap.parse_args()

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    base = config(args, [])
    torch.manual_seed(base.trainer.seed)
    corpus = build_corpus(base.data)
    trained = build_model(base.model)
    t0 = time.perf_counter()
    if args.init_from:
        trained.load_state_dict(torch.load(resolve_init_from(args.init_from, base.tracking.uri), weights_only=True))
    else:
        fit(trained, corpus, base, env)
    cpu = cpu_info()
    print(f"CPU: {cpu.model} ({','.join(sorted(cpu.features)) or 'features unknown'}), torch {torch.__version__}")
    params = count_params(trained)[0] / 1e6
    how = "loaded" if args.init_from else "trained"
    print(f"{args.model} ({params:.1f}M parameters), {torch.get_num_threads()} threads, {how} in "
          f"{time.perf_counter() - t0:.0f}s; inference batch {args.batch}x{base.model.block_size}, "
          f"{args.iters} timed passes\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="costlab-bench-"))
    dense_size = save_model(trained, tmp / "dense" / "model.pt")

    header = (f"{'option':<31}{'size MB':>8}{'smaller':>8}{'sparse':>8}{'params':>8}{'speed-up':>9}"
              f"{'decode':>8}{'ms p50':>8}{'loss':>8}{'delta':>8}  backend")
    print(header + "\n" + "-" * len(header))
    results: dict[str, tuple[float, float, float]] = {}
    for i, (name, extra) in enumerate(OPTIONS.items()):
        if args.only and name not in args.only:
            continue
        cfg = config(args, extra)
        torch.manual_seed(cfg.trainer.seed)
        model = copy.deepcopy(trained)
        qcfg = copy.deepcopy(cfg)
        qcfg.trainer.max_steps, qcfg.trainer.warmup_steps = args.qat_steps, 0  # all steps fake-quantized
        hook = build_quantization(cfg).training_hook(model, qcfg)
        if hook is not None:  # QAT is training: fine-tune with fake quantization first
            fit(model, corpus, qcfg, env, [hook])
        # the run's own final step: reference (QAT: the fine-tuned float model), compress, measure both
        m, tags = evaluate_final(model, corpus, cfg, env, tmp / str(i))
        results[name] = (m["model/size_ratio"], m["infer/speedup"], m["eval/loss_delta"])
        probe = "  ".join(f"{k.rsplit('_', 1)[-1]} {v:.1f}" for k, v in m.items() if "probe_ms" in k)
        print(f"{name:<31}{m['model/size_bytes'] / 1e6:>8.2f}{m['model/size_ratio']:>7.2f}x"
              f"{m['model/size_bytes_uncompressed'] / m['model/size_bytes_sparse']:>7.2f}x"
              f"{m['model/params'] / 1e6:>7.2f}M{m['infer/speedup']:>8.2f}x{m['infer/decode_speedup']:>7.2f}x"
              f"{m['infer/latency_ms_p50']:>8.1f}"
              f"{m['eval/loss']:>8.3f}{100 * m['eval/loss_delta']:>+7.2f}%  {tags.get(BACKEND_TAG, '')}"
              + (f" (probe ms: {probe})" if probe else ""), flush=True)
        del model

    print(f"\nuncompressed: {dense_size / 1e6:.2f} MB, {count_params(trained)[0] / 1e6:.2f}M parameters. "
          "'smaller' is the dense file ratio; 'sparse' what a values+bitmask encoding of the zeros would give.")
    print("goals:")
    for name, smaller, faster, worse in GOALS:
        if name not in results:
            continue
        got = results[name]
        checks = [("smaller", got[0], smaller, got[0] >= smaller), ("faster", got[1], faster, got[1] >= faster)]
        line = ", ".join(f"{what} {value:.2f}x (goal >= {goal}x) {'met' if ok else 'MISSED'}"
                         for what, value, goal, ok in checks)
        if worse is not None:
            line += f", loss delta {100 * got[2]:+.2f}% (goal <= {100 * worse:.0f}%) " + (
                "met" if got[2] <= worse else "MISSED")
        print(f"  {name}: {line}")
    # rows are compared by their speed-ups: each is timed interleaved with the same uncompressed model, so
    # load that comes and goes between rows falls on both sides of each ratio
    speedup = {name: r[1] for name, r in results.items()}
    fixed = [speedup[b] for b in ("int8_dynamic torchao", "int8_dynamic pytorch") if b in speedup]
    if len(fixed) == 2 and "int8_dynamic auto" in speedup:
        auto, best = speedup["int8_dynamic auto"], max(fixed)
        print(f"  int8_dynamic auto: {auto:.2f}x vs the faster fixed backend's {best:.2f}x "
              f"(goal: within {100 * (AUTO_SLACK - 1):.0f} %) {'met' if auto * AUTO_SLACK >= best else 'MISSED'}")
    for name in ("structured 0.3 + int8_dynamic", "structured 0.5 + int8_dynamic"):
        if name in speedup and "int8_dynamic auto" in speedup:
            alone = speedup["int8_dynamic auto"]
            print(f"  {name}: {speedup[name]:.2f}x vs int8_dynamic alone {alone:.2f}x (goal: not slower) "
                  f"{'met' if speedup[name] >= alone else 'MISSED'}")


if __name__ == "__main__":
    main()
