"""How long a layout search takes and how much memory it needs, against the planner's goal: a 70B-parameter
config on 64 H100s (8 nodes of 8) in under 60 s and under 2 GB of resident memory, on a laptop-class CPU.

It runs ``python run.py mode=plan plan.search=true`` for Llama-3-70B's config (4,096 tokens, a global batch of 256
sequences) as a user would, into a SQLite store of its own, and prints the wall time, the search's own time (from
its table's first line), the largest resident set of the process and its children, and how many candidates it
tried and kept. Nothing is allocated for the model: it is built on the meta device and traced on fake tensors.
Run it alone: on a loaded machine the search is slower.

    python benchmarks/plan_search.py
    python benchmarks/plan_search.py --config llama3_8b --nodes 2
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from costlab.measure.machine import cpu_info  # noqa: E402  (torch-free)

GOAL_S, GOAL_RSS = 60.0, 2e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama3_70b", help="a config of conf/hf_configs")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--per-node", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "run.py"), "mode=plan", "plan.search=true", "model=hf",
               f"model.config={args.config}", "model.block_size=4096", "hardware=h100_sxm",
               f"trainer.nnodes={args.nodes}", f"trainer.nproc_per_node={args.per_node}", "trainer.batch_size=256",
               "plan.tokens=1e12", f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/run"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    found = re.search(r"plan search: (\d+) candidates, (\d+) fit \(([\d.]+) s\)", proc.stderr + proc.stdout)
    if found is None:
        sys.exit("no search table in the output:\n" + proc.stderr[-3000:])
    candidates, fit, search_s = int(found[1]), int(found[2]), float(found[3])
    cpu = cpu_info()
    print(f"{args.config} on {args.nodes} x {args.per_node} H100 SXM, searched on {cpu.model}, {os.cpu_count()} "
          f"cores, features {','.join(sorted(cpu.features)) or 'unknown'}")
    print(f"  candidates {candidates:,}, fit {fit:,}")
    verdict = "met" if wall < GOAL_S else "MISSED"
    print(f"  wall {wall:.1f} s (search {search_s:.1f} s; goal < {GOAL_S:.0f} s: {verdict})")
    print(f"  max RSS {rss / 1e9:.2f} GB (goal < {GOAL_RSS / 1e9:.0f} GB: {'met' if rss < GOAL_RSS else 'MISSED'})")


if __name__ == "__main__":
    main()
