"""Run every GPU path of costlab once on one CUDA GPU and write down what each measured.

    python benchmarks/gpu_check.py OUT_DIR                          # every case, sized for < 8 min on an H100
    python benchmarks/gpu_check.py OUT_DIR --only fp8 int4_weight_only --timeout-per-case 120
    python benchmarks/gpu_check.py OUT_DIR --cpu-dry-run            # which cases this machine would refuse

Every case is a real ``python run.py ... trainer.device=cuda`` job in its own process (torchrun, nccl,
a throwaway SQLite MLflow store at ``OUT_DIR/mlflow.db``, run folder ``OUT_DIR/runs/<case>``); its
figures are read back from MLflow, so they are exactly what a user's run logs. Nothing stops the
script: a refused or failed case is recorded with its one-line refusal or the last lines of its
output, a case that runs past ``--timeout-per-case`` gets SIGTERM (run.py then stops its torchrun
workers and closes the run KILLED), and the next case runs. ``OUT_DIR/gpu_check.md`` (one table) and
``OUT_DIR/gpu_check.json`` (raw metrics, card, driver, CUDA and torch versions) are rewritten after
every case, so a check cut short still leaves what it measured. Cases not started within ``--budget``
seconds (default 480) are recorded as not run, so the whole check ends inside about nine minutes even
when cases hang. A rerun with ``--only`` into the same folder replaces those cases' rows and keeps the others.

What the figures mean
---------------------
* Every figure is the run's own, as a user's run logs it: ``perf/tokens_per_s`` (after warm-up, the device
  synchronised), ``perf/mfu`` against ``perf/peak_tflops_per_device`` (the dense datasheet peak of the run's
  matmul dtype from the ``hardware`` option that ``auto`` resolves from the card's name; fp32 is the
  non-tensor-core figure, costlab leaves TF32 off), and FLOPs from the cost model (``perf/flops_per_token``).
* Predictions beside measurements: ``perf/predicted_tokens_per_s`` is the time model's forecast from probes on the
  card at the end of the run (the run's matmul shapes, the host's dispatch per op, a large add, the run's model
  plain at two depths on its micro-batch; attention and links from the hardware option), so its error is what
  the model misses with the card at hand; ``perf/planned_tokens_per_s`` is the plan's forecast from the card's
  hardware option alone (its published attainable matmul rate, datasheet bandwidths, and the shares fitted on
  A100 publications), so its error is what the calibration misses on this card;
  ``mem/predicted_over_measured`` is the predicted per-rank total (parameters, gradients, optimizer state,
  activations) over ``torch.cuda.max_memory_allocated``; ``mem/activations_bytes_per_rank`` (measured with
  saved-tensor accounting on the first step) against ``mem/predicted_activations_bytes_per_rank``.
  ``trainer.compile=true`` measures no activations (the tag ``costlab.activations_unmeasured`` says so).
* With one GPU costlab's parallelism degrees are all 1, so ``parallelism=ddp|fsdp`` run unwrapped:
  those rows check the launcher path with nccl at world size 1, not DDP or FSDP themselves.
* Inference speed-ups come from ``infer/speedup``: the compressed and the uncompressed model timed
  interleaved on one batch. At gpt_micro's width small kernels are launch-bound, so they say whether a
  kernel runs, not what it would buy on a large model.

Without a CUDA GPU every case is recorded as skipped and the script exits 0; ``--cpu-dry-run`` instead
validates each case's config for CPU in this process (``costlab.launcher.validate.validate``) and records
"valid on CPU" or the refusal, which shows which paths need a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

EXPERIMENT = "gpu-check"
TAIL_LINES = 40
TERM_WAIT_S = 60.0  # run.py gives its torchrun workers 15 s after SIGTERM, then closes the MLflow run
SKIPPED = "skipped: no CUDA GPU visible"
VALID_ON_CPU = "valid on CPU"

# gpt_micro (~10.8M) with a 128-sequence batch: big enough that a step is not only kernel launches,
# small enough that a case costs seconds of GPU time after start-up
MICRO = [
    "model=gpt_micro", "trainer.max_steps=150", "trainer.batch_size=128", "trainer.timing_warmup_steps=10",
    "trainer.infer_batch_size=32", "trainer.infer_iters=20",
]
# GPT-2 small's shape; compile's first steps are excluded from the timing by the warm-up
GPT2_SIZE = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
             "model.vocab_size=50257"]
LARGE = ["trainer.max_steps=50", "trainer.warmup_steps=10",
         "trainer.timing_warmup_steps=10", "trainer.eval_batch_size=8", "trainer.eval_batches=2",
         "trainer.infer_batch_size=4", "trainer.infer_iters=5"]
# every case, unless it says otherwise: no evaluation during training, a short final one, sparse progress lines;
# the serving ladder and the MLflow model only where a case turns them on (they are not GPU kernels)
COMMON = ["trainer.eval_interval=0", "trainer.eval_batches=4", "trainer.print_every=25", "serve.enabled=false",
          "tracking.log_model=false"]
# the serving ladder and the logged MLflow model, on one case
SERVE = ["serve.enabled=true", "tracking.log_model=true"]
SHARED = set(MICRO[1:] + LARGE)  # left out of the table's overrides column, named once in its caption


@dataclass(frozen=True)
class Case:
    name: str
    overrides: list[str]
    note: str = ""


# In order of what matters most if the time budget runs out: the predictions against measurement on the
# eager models first (compile measures no activations), then the GPU-only kernels, the large compiled models,
# and the one-rank launcher paths and the fp32 reference last.
CASES: list[Case] = [
    Case("bf16", ["precision=bf16", *MICRO, *SERVE], "bf16 autocast on tensor cores; serving ladder, MLflow model"),
    Case("gpt2_small_eager", ["model=gpt2_small", "precision=bf16", *LARGE], "124M, no compile"),
    Case("gpt2_small_full_ckpt", ["model=gpt2_small", "precision=bf16", "trainer.activation_checkpointing=full",
                                  *LARGE], "124M, every block recomputed"),
    Case("gpt2_small_selective", ["model=gpt2_small", "precision=bf16",
                                  "trainer.activation_checkpointing=selective", *LARGE], "124M, attention recomputed"),
    Case("hf_llama", ["model=hf", "model.config=llama_tiny", "precision=bf16", *MICRO[1:]],
         "a Hugging Face Llama from conf/hf_configs, random weights"),
    Case("fp16", ["precision=fp16", *MICRO], "fp16 autocast + GradScaler"),
    Case("fp8", ["precision=fp8", *MICRO], "torchao float8 training, SM89+"),
    Case("int8_dynamic", ["quantization=int8_dynamic", "precision=bf16", *MICRO], "trained in bf16"),
    Case("int8_weight_only", ["quantization=int8_weight_only", "precision=bf16", *MICRO], "trained in bf16"),
    Case("int4_weight_only", ["quantization=int4_weight_only", "precision=bf16", *MICRO], "SM80+, bf16 required"),
    Case("fp8_quant", ["quantization=fp8", "precision=bf16", *MICRO], "float8 weights+activations, SM89+"),
    Case("semi_structured", ["pruning=semi_structured", "precision=bf16", *MICRO], "2:4 sparse kernels, SM80+"),
    Case("compile", ["trainer.compile=true", "precision=bf16", *MICRO], "compare with bf16"),
    Case("gpt2_small", ["model=gpt2_small", "precision=bf16", "trainer.compile=true", *LARGE], "124M"),
    Case("llama_gpt2_size", ["model=llama_nano", *GPT2_SIZE, "precision=bf16", "trainer.compile=true", *LARGE],
         "llama_nano scaled to GPT-2 small's shape"),
    Case("ddp_1rank", ["parallelism=ddp", "trainer.nproc_per_node=1", "precision=bf16", *MICRO],
         "one rank: degrees 1, no DDP wrapper"),
    Case("fsdp_1rank", ["parallelism=fsdp", "trainer.nproc_per_node=1", "precision=bf16", *MICRO],
         "one rank: degrees 1, no FSDP wrapper"),
    Case("fp32", ["precision=fp32", *MICRO], "reference for the precision rows, no TF32"),
]


@dataclass
class Result:
    name: str
    overrides: list[str]
    note: str
    status: str = "not run"
    detail: str = ""
    returncode: int | None = None
    wall_s: float | None = None
    mlflow_status: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # costlab's own tags: what a figure assumed or why it is missing
    error_tail: str = ""
    card: str | None = None  # the card this row was measured on (a rerun may be on another one)


def overrides_for(case: Case, *extra: str) -> list[str]:
    """COMMON, then the case's own, then ``extra``; a later value of a key replaces an earlier one, so a key
    is never given twice."""
    merged: dict[str, str] = {}
    for override in [*COMMON, *case.overrides, *extra]:
        merged[override.split("=", 1)[0]] = override
    return list(merged.values())


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, Any]:
    """Card, driver, CUDA and library versions. Reads ``nvidia-smi`` and torch's build facts only, so
    this process never takes a CUDA context (the GPU stays whole for the cases)."""
    from importlib import metadata

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "host": platform.node()}
    for pkg in ("torchao", "mlflow"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    query = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                  "--format=csv,noheader"])
    env["gpus"] = [dict(zip(("name", "driver", "memory", "compute_cap"), (x.strip() for x in line.split(",")),
                            strict=False))
                   for line in query.strip().splitlines() if line.strip()]
    header = re.search(r"CUDA Version:\s*([\d.]+)", _run(["nvidia-smi"]))
    env["cuda_driver"] = header.group(1) if header else None
    env["card"] = env["gpus"][0]["name"] if env["gpus"] else None
    env["driver"] = env["gpus"][0].get("driver") if env["gpus"] else None
    return env


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.exists():
        return ""
    with path.open(errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


def refusal(path: Path) -> str:
    """run.py's one-line refusal (exit 2), without its ``costlab: error:`` prefix."""
    found = [ln for ln in tail(path, 200).splitlines() if ln.startswith("costlab: error:")]
    return found[-1].removeprefix("costlab: error:").strip() if found else ""


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: run.py turns it into Ctrl-C, stops its torchrun group and closes the run KILLED.
    Only a launcher that ignores it for a minute gets SIGKILL (its workers are gone by then)."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(TERM_WAIT_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def read_run(uri: str, name: str, since_s: float) -> Any:
    """The newest MLflow run of ``name`` in the check's experiment started after ``since_s`` (a rerun into
    the same folder must not read an earlier run's figures), or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    query = f"tags.mlflow.runName = '{name}' and attributes.start_time >= {int(since_s * 1000)}"
    runs = client.search_runs([exp.experiment_id], query,
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def run_case(case: Case, out: Path, timeout_s: float, env: dict[str, Any]) -> Result:
    result = Result(case.name, case.overrides, case.note, card=env.get("card"))
    uri = f"sqlite:///{out / 'mlflow.db'}"
    run_dir = out / "runs" / case.name
    log = out / "logs" / f"{case.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides_for(
        case, "trainer.device=cuda", f"tracking.uri={uri}", f"tracking.experiment_name={EXPERIMENT}",
        f"tracking.run_name={case.name}", f"hydra.run.dir={run_dir}")]
    # the source tree's costlab for run.py and, through torchrun's inherited environment, the workers:
    # the check runs from a checkout on a machine where costlab was never pip-installed
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.time()
    with log.open("wb") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        # its own session: a Ctrl-C in this terminal reaches run.py only through stop(), once
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=child_env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
        except KeyboardInterrupt:
            stop(proc)
            raise
    result.wall_s = time.time() - t0
    result.returncode = proc.returncode
    if rc is None:
        result.status = f"timeout after {timeout_s:.0f}s"
    elif rc == 2:
        result.status, result.detail = "refused", refusal(log)
    elif rc != 0:
        result.status = f"failed (exit {rc})"
    run = None
    try:
        run = read_run(uri, case.name, t0) if (out / "mlflow.db").exists() else None
    except Exception as e:  # a store that cannot be read is this case's record, not the end of the check
        result.detail = f"MLflow not readable: {e}"
    if run is not None:
        result.mlflow_status = run.info.status
        result.metrics = dict(run.data.metrics)
        result.tags = {k: v for k, v in run.data.tags.items() if k.startswith("costlab.")}
    if rc == 0:
        result.status = "ok" if run is not None and "perf/tokens_per_s" in result.metrics else "failed (no metrics)"
    if result.status != "ok" and result.status != "refused":
        result.error_tail = tail(log)
    return result


def dry_run_case(case: Case) -> Result:
    """Validate the case's config for CPU, in this process, as run.py would before starting workers."""
    from costlab.launcher.preflight import compose_config
    from costlab.launcher.validate import validate
    from costlab.schema import ConfigError

    result = Result(case.name, case.overrides, case.note)
    try:
        validate(compose_config(overrides_for(case, "trainer.device=cpu")))
        result.status = VALID_ON_CPU
    except ConfigError as e:
        result.status, result.detail = "refused on CPU", str(e)
    except Exception as e:  # a check that breaks is a finding about that case, not the end of the dry run
        result.status, result.detail = "error on CPU", f"{type(e).__name__}: {e}".splitlines()[0]
    return result


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value / scale:{spec}}{suffix}"


def error(predicted: float | None, measured: float | None) -> str:
    """A prediction's signed relative error against its measurement, or '-' where either is missing."""
    if predicted is None or not measured:
        return "-"
    return f"{(predicted - measured) / measured:+.0%}"


def table(results: list[Result], env: dict[str, Any], mode: str) -> str:
    """One Markdown table, a caption naming what each column is, then the failures' tails."""
    card = env.get("card") or "no CUDA GPU"
    caption = [
        f"**costlab GPU check** ({mode}): {card}, driver {env.get('driver') or '-'}, "
        f"CUDA {env.get('cuda_driver') or '-'} (torch built for CUDA {env.get('torch_cuda') or '-'}), "
        f"torch {env.get('torch')}, torchao {env.get('torchao') or '-'}.",
        "Every figure is the run's own: tokens/s measured (`perf/tokens_per_s`), predicted from probes on the "
        "card (`perf/predicted_tokens_per_s`) and planned from the card's hardware option and the A100-fitted "
        "shares (`perf/planned_tokens_per_s`), each with its error; MFU (`perf/mfu`, the cost model's FLOPs "
        "against the datasheet peak of the run's matmul dtype); peak memory `mem/peak_bytes` "
        "(max_memory_allocated) and `mem/predicted_over_measured` (predicted per-rank total over it); activations "
        "saved for backward, measured (`mem/activations_bytes_per_rank`) and the prediction's error; "
        "`mem/peak_reserved_bytes` (max_memory_reserved); `infer/speedup`, the compressed model against the "
        "uncompressed one on one batch.",
        f"Every gpt_micro case also sets `{' '.join(MICRO[1:])}`; the GPT-2-sized ones `{' '.join(LARGE)}`; "
        f"every case `{' '.join(COMMON)}` (all overrides per case are in gpu_check.json).",
    ]
    cards = {r.card for r in results if r.card}
    if len(cards) > 1:
        caption.append("Rows from more than one card: " + ", ".join(f"{r.name} on {r.card}" for r in results if r.card)
                       + "; MFU is against each row's own card.")
    caption.append("")
    head = ["case", "status", "tokens/s", "predicted (error)", "planned (error)", "MFU", "peak allocated GiB",
            "predicted / allocated", "activations MiB (predicted error)", "peak reserved GiB", "inference speed-up",
            "overrides (note)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        status = r.status + (f": {r.detail}" if r.detail else "")
        if r.error_tail:
            status += " (tail below)"
        m = r.metrics
        tokens = m.get("perf/tokens_per_s")
        predicted, planned = m.get("perf/predicted_tokens_per_s"), m.get("perf/planned_tokens_per_s")
        activations = m.get("mem/activations_bytes_per_rank")
        row = [
            r.name, status, fmt(tokens, ",.0f"),
            *("-" if f is None else f"{f:,.0f} ({error(f, tokens)})" for f in (predicted, planned)),
            fmt(m.get("perf/mfu"), ".1%"),
            fmt(m.get("mem/peak_bytes"), ".2f", 2**30), fmt(m.get("mem/predicted_over_measured"), ".2f"),
            "-" if activations is None else
            f"{activations / 2**20:,.1f} ({error(m.get('mem/predicted_activations_bytes_per_rank'), activations)})",
            fmt(m.get("mem/peak_reserved_bytes"), ".2f", 2**30), fmt(m.get("infer/speedup"), ".2f", suffix="x"),
            "`" + " ".join(o for o in r.overrides if o not in SHARED) + "`" + (f" ({r.note})" if r.note else ""),
        ]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    text = caption + lines
    tails = [r for r in results if r.error_tail]
    if tails:
        text += ["", "## Error tails", ""]
        for r in tails:
            text += [f"### {r.name}: {r.status}", "", "```text", r.error_tail.rstrip("\n"), "```", ""]
    return "\n".join(text).rstrip("\n") + "\n"


def write(out: Path, results: list[Result], env: dict[str, Any], mode: str, elapsed_s: float | None = None) -> None:
    """Both files, replaced whole (written aside, then renamed) so a reader never sees half of one."""
    data = {"generated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": mode,
            "elapsed_s": elapsed_s, "experiment": EXPERIMENT, "environment": env,
            "cases": [r.__dict__ for r in results]}
    for name, text in (("gpu_check.json", json.dumps(data, indent=2, default=str) + "\n"),
                       ("gpu_check.md", table(results, env, mode))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def previous(out: Path) -> dict[str, Result]:
    """Rows of an earlier check in the same folder, kept when a rerun covers only some cases."""
    path = out / "gpu_check.json"
    try:
        cases = json.loads(path.read_text())["cases"]
        return {c["name"]: Result(**c) for c in cases}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu_check.md, gpu_check.json, mlflow.db, runs/")
    parser.add_argument("--timeout-per-case", type=float, default=150.0, metavar="S",
                        help="seconds before a case gets SIGTERM (default 150)")
    parser.add_argument("--budget", type=float, default=480.0, metavar="S",
                        help="seconds for all cases; cases not started by then are recorded as not run (default 480)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[c.name for c in CASES],
                        help="run only these cases")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="validate every case's config for CPU here instead of running it")
    args = parser.parse_args(argv)

    from costlab.measure.machine import visible_gpus

    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    mode = "cpu-dry-run" if args.cpu_dry_run else ("gpu" if visible_gpus() else "no-gpu")
    env = environment()
    # a rerun of some cases into the same folder keeps the other cases' rows
    kept = previous(out) if args.only and mode == "gpu" else {}
    results = {c.name: Result(c.name, c.overrides, c.note) if c in cases else kept[c.name] for c in CASES
               if c in cases or c.name in kept}

    def order() -> list[Result]:
        return [results[c.name] for c in CASES if c.name in results]

    if mode != "gpu":
        for case in cases:
            results[case.name] = dry_run_case(case) if args.cpu_dry_run else Result(
                case.name, case.overrides, case.note, status=SKIPPED)
        write(out, order(), env, mode)
        print((out / "gpu_check.md").read_text())
        return 0

    signal.signal(signal.SIGTERM, _interrupt)  # stopped from outside: stop the running case the same way
    started = time.time()
    deadline = started + args.budget
    write(out, order(), env, mode, 0.0)  # the files exist from the start, whatever stops the check
    case = None
    try:
        for case in cases:
            left = deadline - time.time()
            if left < 30:
                results[case.name] = Result(case.name, case.overrides, case.note,
                                            status=f"not run: the {args.budget:.0f}s budget was spent")
                continue
            print(f"gpu_check: {case.name} ...", file=sys.stderr, flush=True)
            results[case.name] = run_case(case, out, min(args.timeout_per_case, left), env)
            r = results[case.name]
            print(f"gpu_check: {case.name}: {r.status} {r.detail} ({r.wall_s:.0f}s)", file=sys.stderr, flush=True)
            write(out, order(), env, mode, time.time() - started)
    except KeyboardInterrupt:
        if case is not None and results[case.name].status == "not run":
            log = out / "logs" / f"{case.name}.log"
            results[case.name].status, results[case.name].error_tail = "interrupted", tail(log)
        write(out, order(), env, mode, time.time() - started)
        print("gpu_check: interrupted; results so far are in " + str(out), file=sys.stderr)
        return 130
    write(out, order(), env, mode, time.time() - started)
    print((out / "gpu_check.md").read_text())
    print(f"gpu_check: {time.time() - started:.0f}s for {len(cases)} case(s); {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
