"""What a job costs before and after its work: a 1-step tiny ``run.py`` job against torchrun's own start-up.

A search runs many short jobs, so each job's fixed cost matters. This runs, alternately in this one
process, a bare ``torchrun`` hello-world (start, join a gloo group, barrier, exit: the floor any
torchrun-launched job pays) and ``python run.py`` with a 2-layer model for one step into a SQLite store
(composing, validating, opening the run, starting the rank, data, model, one step, the final
measurements and the model file, closing the run). It prints both walls, their difference against the
goal (at most 5 s above torchrun's start-up), and where the job's time went, from the console lines it
prints as it goes. Run it alone: on a loaded machine every start-up is slower.

    python benchmarks/startup.py                 # 3 repeats of each
    python benchmarks/startup.py --repeats 5 --nproc 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from costlab.measure.machine import cpu_info  # noqa: E402  (torch-free)

GOAL_S = 5.0
HELLO = """import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
"""
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data=synthetic",
    "data.n_bytes=20000", "trainer.max_steps=1", "trainer.batch_size=8", "trainer.eval_interval=0",
    "trainer.eval_batches=2", "trainer.eval_batch_size=8", "trainer.infer_iters=2", "trainer.gen_prompt_len=8",
    "trainer.gen_tokens=4", "trainer.gen_iters=2", "trainer.timing_warmup_steps=0",
]
# console lines of a job and the phase each one starts (the launcher's and rank 0's own words)
PHASES = [
    ("starting", "compose, validate; start torchrun while opening the store and the run"),
    ("loading data", "the rank's remaining imports, joining the group"),
    ("building", "load the data"),
    ("training", "build the model, predict memory, parallelise"),
    ("compressing", "train"),
    ("summary:", "evaluate, time inference and generation, save the model"),
    ("FINISHED", "stop the rank and torchrun, relay the last metrics, close the run"),
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("GLOO_SOCKET_IFNAME", "lo")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def timed_lines(cmd: list[str], cwd: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd``; return its wall time and each output line with the second it arrived."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - t0, line.rstrip()) for line in proc.stdout]
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {rc}:\n{tail}")
    return wall, lines


def torchrun_hello(tmp: Path, nproc: int) -> float:
    script = tmp / "hello.py"
    script.write_text(HELLO)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", str(script)]
    return timed_lines(cmd, tmp)[0]


def costlab_job(tmp: Path, nproc: int, i: int) -> tuple[float, dict[str, float]]:
    overrides = [*TINY, f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/run{i}"]
    if nproc > 1:
        overrides += ["parallelism=ddp", f"trainer.nproc_per_node={nproc}"]
    wall, lines = timed_lines([sys.executable, str(ROOT / "run.py"), *overrides], ROOT)
    marks: dict[str, float] = {}
    for at, text in lines:
        for word, _ in PHASES:
            if word not in marks and (text.startswith(word) or f" {word}" in text):
                marks[word] = at
    phases, start = {}, 0.0
    for word, what in PHASES:
        if word in marks:
            phases[what] = marks[word] - start
            start = marks[word]
    phases["exit run.py"] = wall - start
    return wall, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=1, help="ranks of both (the job runs parallelism=ddp when > 1)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # the store exists before the first timed job, as it does for every job after a user's first
        costlab_job(tmp, args.nproc, -1)
        hello, jobs, phases = [], [], []
        for i in range(args.repeats):  # alternated, so drift on a shared machine hits both
            hello.append(torchrun_hello(tmp, args.nproc))
            wall, p = costlab_job(tmp, args.nproc, i)
            jobs.append(wall)
            phases.append(p)
    h, j = statistics.median(hello), statistics.median(jobs)
    cpu = cpu_info()
    print(f"\nCPU: {cpu.model} ({os.cpu_count()} cores), {args.nproc} rank(s), median of {args.repeats}, "
          f"SQLite store, python {sys.version.split()[0]}")
    print("| what | wall s |")
    print("|---|---|")
    print(f"| torchrun hello-world (start, gloo group, barrier, exit) | {h:.2f} |")
    print(f"| costlab 1-step tiny job (`python run.py`) | {j:.2f} |")
    verdict = "met" if j - h <= GOAL_S else "NOT met"
    print(f"| costlab above torchrun (goal <= {GOAL_S:.0f} s: {verdict}) | {j - h:.2f} |")
    print("\nwhere the job's time went (median s):")
    print("| phase | s |")
    print("|---|---|")
    for what in phases[0]:
        values = [p[what] for p in phases if what in p]
        print(f"| {what} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
