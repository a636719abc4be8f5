"""The worker: one per rank, started by torchrun with the resolved config file.

    python -m torch.distributed.run --standalone --nproc-per-node=N -m costlab.worker run_dir/config.yaml

It reads like the flow of a run: build → parallelize → train → compress → evaluate → log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from costlab.checkpoint import CHECKPOINT_TAG, load_init, trained_model_file
from costlab.data import build_corpus
from costlab.evaluation import evaluate_final
from costlab.metrics import max_over_ranks, peak_memory_bytes, peak_reserved_memory
from costlab.model import build_model
from costlab.names import MEM_PEAK
from costlab.parallelism.core import DistEnv, init_distributed
from costlab.parallelism.parallelize import parallelize
from costlab.pruning import build_pruning
from costlab.quantization import build_quantization
from costlab.tracking import MetricLogger, client
from costlab.train import build_optimizer, train


def seed_everything(seed: int) -> None:
    # the same seed on every rank: replicas start identical, the sampler slices the global batch
    torch.manual_seed(seed)


def say(env: DistEnv, what: str) -> None:
    """A progress line from rank 0, so no phase of a run is silent."""
    if env.is_main:
        print(what, flush=True)


def run(cfg: DictConfig, env: DistEnv) -> None:
    seed_everything(cfg.trainer.seed)
    say(env, f"loading data ({cfg.data.get('name', 'data')})")
    corpus = build_corpus(cfg.data)
    say(env, f"building {cfg.model.get('name', 'the model')} and parallelising it "
             f"({cfg.parallelism.get('name', '')}, {env.world_size} rank(s))")
    model = build_model(cfg.model)
    if cfg.trainer.get("init_from"):
        load_init(model, cfg)
    # train-time compression acts on the plain module, before any wrapper holds it
    options = (build_pruning(cfg), build_quantization(cfg))
    hooks = [h for h in (o.training_hook(model, cfg) for o in options) if h is not None]
    parallel = parallelize(model, cfg, env)
    optimizer = build_optimizer(parallel.model, cfg)
    logger = MetricLogger(cfg.tracking.uri, cfg.runtime.run_id) if env.is_main else None
    try:
        say(env, f"training {cfg.trainer.max_steps} steps")
        result = train(parallel, optimizer, corpus, cfg, env, logger, step_hooks=hooks)
        summary = {k: max_over_ranks(v, env.device) for k, v in result.state_bytes.items()}
        final = parallel.full_model(cfg)  # collective: every rank takes part
        if env.is_main:
            summary.update(result.stats.summary())
            if env.device.type == "cpu":
                # the other ranks now only wait: the final model is measured on the node's whole CPU,
                # so its inference figures do not depend on the world size it was trained with
                torch.set_num_threads(os.cpu_count() or 1)
            run_dir = Path(cfg.runtime.run_dir)
            say(env, "compressing (if asked), measuring quality, size and inference speed, saving the model")
            summary.update(evaluate_final(final, corpus, cfg, env, run_dir))
            # what trainer.init_from=<this run id> starts from
            client(cfg.tracking.uri).set_tag(cfg.runtime.run_id, CHECKPOINT_TAG, str(trained_model_file(run_dir)))
            if corpus.entropy_floor is not None:
                summary["data/entropy_floor"] = corpus.entropy_floor
            if cfg.trainer.max_steps > 0:  # a run that only compresses a loaded model trains nothing
                summary["train/final_loss"] = result.final_loss
        summary[MEM_PEAK] = max_over_ranks(peak_memory_bytes(env.device), env.device)
        summary.update(peak_reserved_memory(env.device))
        if logger is not None:
            summary["tracking/log_overhead_s"] = logger.time_spent_s
            logger.log(summary, cfg.trainer.max_steps)
            print("summary:\n" + "\n".join(f"  {k:<34} {v:.6g}" for k, v in sorted(summary.items())), flush=True)
    finally:
        if logger is not None:
            logger.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m costlab.worker RUN_DIR/config.yaml")
    cfg = OmegaConf.load(argv[0])
    env = init_distributed(cfg)
    run(cfg, env)
    if dist.is_initialized():
        # leave together: a gloo rank that tears down while its peer is still connected can abort
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
