"""costlab's training loop against a plain hand-written PyTorch loop, and what MLflow logging costs.

Both loops train the same model (same init, batch, precision, optimizer and clipping) in this one
process; runs alternate A/B so drift on a shared machine hits both. Prints a table of ratios.

    python benchmarks/training_loop.py                  # gpt_nano, fp32 and bf16
    python benchmarks/training_loop.py --steps 40 --repeats 3 --precision fp32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from omegaconf import open_dict

from costlab.data import BatchSampler, build_corpus
from costlab.events import MetricLogger
from costlab.launcher.preflight import compose_config
from costlab.measure.metrics import now
from costlab.models.gpt import build_model
from costlab.parallelism.core import DistEnv
from costlab.parallelism.parallelize import parallelize
from costlab.precision import autocast
from costlab.tracking.relay import Relay
from costlab.tracking.store import experiment_id
from costlab.training.optimizers import build_optimizer
from costlab.training.trainer import Trainer


def plain_loop(cfg, corpus, steps: int, warmup: int) -> float:
    """A hand-written loop: the baseline any PyTorch user would write. Returns tokens/s after warm-up."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, betas=tuple(cfg.trainer.betas),
                            weight_decay=cfg.trainer.weight_decay)
    sampler = BatchSampler(corpus.train, cfg.model.block_size, cfg.trainer.batch_size, cfg.trainer.seed)
    device = torch.device("cpu")
    times = []
    for step in range(steps):
        t0 = now(device)
        x, y = sampler.batch(step)
        with autocast(cfg, device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step >= warmup:
            times.append(now(device) - t0)
    return cfg.trainer.batch_size * cfg.model.block_size * len(times) / sum(times)


def costlab_loop(cfg, corpus, uri: str) -> tuple[float, float, float, float]:
    """costlab's ``train()`` logging every step to a real SQLite store: into a run folder, relayed into
    the store by a :class:`~costlab.tracking.relay.Relay` (in ``run.py`` it runs in the launcher's process; here
    in this one, which only makes the comparison harder on costlab).

    Returns (tokens/s after warm-up, hot-path logging seconds, relay seconds writing the store, loop seconds).
    """
    from mlflow.tracking import MlflowClient

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model)
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"))
    parallel = parallelize(model, cfg, env)
    opt = build_optimizer(parallel.model, cfg)
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(uri, "benchmark")).info.run_id
    with tempfile.TemporaryDirectory() as run_dir:
        relay = Relay(uri, run_id, run_dir)
        logger = MetricLogger(run_dir)
        t0 = time.perf_counter()
        result = Trainer(parallel, opt, corpus, cfg, env, logger).train()
        loop_s = time.perf_counter() - t0
        logger.close()
        if relay.close() is not None:
            raise RuntimeError(f"metric logging failed: {relay.error}")
    client.set_terminated(run_id)
    return result.stats.summary()["perf/tokens_per_s"], logger.time_spent_s, relay.flush_time_s, loop_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt_nano")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        experiment_id(uri, "benchmark")
        rows = []
        for precision in args.precision:
            cfg = compose_config([f"model={args.model}", f"precision={precision}"])
            with open_dict(cfg):
                cfg.trainer.update(max_steps=args.steps, timing_warmup_steps=args.warmup, eval_interval=0,
                                   print_every=10**9, log_every=1, device="cpu")
            corpus = build_corpus(cfg.data)
            plain, ours, hot, flush, loop = [], [], [], [], []
            for _ in range(args.repeats):  # A/B alternation
                plain.append(plain_loop(cfg, corpus, args.steps, args.warmup))
                tps, hot_s, flush_s, loop_s = costlab_loop(cfg, corpus, uri)
                ours.append(tps)
                hot.append(hot_s / loop_s)
                flush.append(flush_s / loop_s)
                loop.append(loop_s)
            rows.append((precision, statistics.median(plain), statistics.median(ours),
                         statistics.median([o / p for o, p in zip(ours, plain, strict=True)]),
                         statistics.median(hot), statistics.median(flush)))
    print(f"\nmodel={args.model} batch={cfg.trainer.batch_size}x{cfg.model.block_size} steps={args.steps} "
          f"(warm-up {args.warmup} excluded) repeats={args.repeats} threads={torch.get_num_threads()}")
    print("| precision | plain loop tok/s | costlab tok/s | ratio (goal >= 0.97) | logging on hot path "
          "(goal <= 1%) | background MLflow writes |")
    print("|---|---|---|---|---|---|")
    for precision, p, o, r, h, f in rows:
        print(f"| {precision} | {p:,.0f} | {o:,.0f} | {r:.3f} | {100 * h:.3f}% | {100 * f:.2f}% of loop time |")


if __name__ == "__main__":
    main()
