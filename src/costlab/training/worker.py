"""The worker: one per rank, started by torchrun with the resolved config file.

    python -m torch.distributed.run --standalone --nproc-per-node=N -m costlab.training run_dir/config.yaml

It reads like the flow of a run: build → parallelize → train → compress → evaluate → log.
"""

from __future__ import annotations

from costlab.faults import block_stop_signals

block_stop_signals()  # before torch starts threads: each thread inherits the mask (see costlab.faults)

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from costlab import quiet_third_party_notes, status
from costlab.data import ByteCorpus, build_corpus
from costlab.data.tokens import TOKENIZER_TAG, Codec, load_codec, tokenize_corpus
from costlab.events import MetricLogger, record_tags
from costlab.faults import (
    LAUNCHER_ENV,
    WORKER_GRACE_S,
    Stopped,
    StopWatcher,
    alive,
    die_with_parent,
    exit_now,
    record_worker,
)
from costlab.measure.activations import MEM_ACTIVATIONS, UNMEASURED_TAG, unmeasured_reason
from costlab.measure.allocator import MEM_STEP_ALLOCATED, malloc_meter
from costlab.measure.energy import (
    ENERGY_INFER,
    TrainingEnergy,
    inference_energy,
    rank_energy_counter,
    training_energy_metrics,
)
from costlab.measure.hardware import cost_and_mfu, flops_per_token
from costlab.measure.memory import (
    PREDICTED_OVER_MEASURED,
    STEP_ALLOCATED,
    predict_state,
    predicted_peak,
    step_allocated_bytes,
)
from costlab.measure.metrics import (
    hold_peaks,
    max_over_ranks,
    peak_memory_bytes,
    peak_reserved_memory,
    restart_peaks,
    sum_over_ranks,
)
from costlab.measure.names import (
    COMPRESSES_IN_TRAINING,
    INFER_TOKENS_PER_S,
    MEM_PEAK,
    MODEL_ADAPTER_BYTES,
    MODEL_TRAINABLE,
    PERF_TOKENS_PER_S,
    SERVE_TARGET_TOKENS_PER_S,
)
from costlab.measure.planprobes import keep_link
from costlab.measure.stepprobes import probe_ranks
from costlab.measure.steptime import predicted_metrics
from costlab.models.adapters import (
    ADAPTER_DIR,
    ADAPTER_TAG,
    adapter_state,
    apply_finetune,
    save_adapter,
    ships_adapter,
    trainable_params,
)
from costlab.models.gpt import build_model
from costlab.models.saved import CHECKPOINT_TAG, load_init, trained_model_file
from costlab.parallelism.core import DistEnv, init_distributed
from costlab.parallelism.dims import parallel_dims
from costlab.parallelism.parallelize import parallelize
from costlab.precision import autocast, matmul_dtype
from costlab.pruning import build_pruning
from costlab.quantization import build_quantization
from costlab.training.evaluation import evaluate_final, infer_batch
from costlab.training.optimizers import build_optimizer
from costlab.training.trainer import Trainer, TrainResult


def seed_everything(seed: int) -> None:
    # the same seed on every rank: replicas start identical, the sampler slices the global batch
    torch.manual_seed(seed)


def say(env: DistEnv, what: str) -> None:
    """A progress line from rank 0, so no phase of a run is silent."""
    if env.is_main:
        print(what, flush=True)


def run(cfg: DictConfig, env: DistEnv, predicted: dict[str, float] | None = None,
        stop: StopWatcher | None = None) -> None:
    """One rank's run; ``predicted`` (rank 0): the memory model's per-rank state bytes, logged beside the
    measured ones; ``stop``: the worker's stop signals (what it flushes if it cannot stop in time)."""
    seed_everything(cfg.trainer.seed)
    codec, corpus = build_data(cfg, env)
    model, flops = build_model_to_train(cfg, env)
    hooks = train_time_hooks(model, cfg)
    counter, energy_source = rank_energy_counter(env.device.type, env.local_rank, env.is_main, cfg.trainer.nnodes)
    energy = TrainingEnergy(counter, cfg.trainer.timing_warmup_steps, cfg.trainer.max_steps)
    trainable = trainable_params(model)  # of the whole model, before any layout splits it
    parallel = parallelize(model, cfg, env)
    optimizer = build_optimizer(parallel.model, cfg)
    logger = open_logger(cfg, env, stop)
    try:
        say(env, f"training {cfg.trainer.max_steps} steps")
        result = Trainer(parallel, optimizer, corpus, cfg, env, logger, [*hooks, energy], stop, resumable=True).train()
        summary = training_summary(result, predicted, env)  # collectives: every rank takes part
        # collective likewise; on a GPU the probes allocate on the card, outside the run's peak memory
        held = hold_peaks(env.device)
        probes = probe_ranks(cfg, env, build_optimizer) if cfg.trainer.max_steps > 0 else None
        restart_peaks(env.device)
        joules = sum_over_ranks(energy.joules, env.device)  # collective: every rank takes part
        adapter = adapter_state(parallel.model) if ships_adapter(cfg) else None  # collective where sharded
        final = parallel.full_model(cfg)  # collective: every rank takes part
        tags: dict[str, str] = {}
        if env.is_main:
            summary.update(training_metrics(result, corpus, cfg))
            summary[MODEL_TRAINABLE] = trainable
            metrics, tags = compress_and_evaluate(final, corpus, codec, cfg, env, counter)
            summary.update(metrics)
            if adapter is not None:  # finetune.merge=false: the adapter ships alone too, in PEFT's format
                folder = Path(cfg.runtime.run_dir) / ADAPTER_DIR
                summary[MODEL_ADAPTER_BYTES] = save_adapter(adapter, cfg, folder)
                tags[ADAPTER_TAG] = str(folder)
            timed_tokens = result.stats.tokens_per_step * len(result.stats.times_s)
            energy_figures, energy_tag = training_energy_metrics(joules, timed_tokens, counter, energy_source)
            summary.update(energy_figures)
            summary.update(predicted or {})
            # the peak last: on CPU its probe runs now, on the node's cores, while the other ranks wait
            cost, mfu_tag = cost_and_mfu(cfg, flops, env.local_world_size, matmul_dtype(cfg),
                                         summary.get(PERF_TOKENS_PER_S), summary.get(INFER_TOKENS_PER_S),
                                         summary.get(SERVE_TARGET_TOKENS_PER_S))
            summary.update(cost)
            tags.update({**energy_tag, **mfu_tag})
            if cfg.trainer.max_steps > 0:  # the time model, beside the measured throughput (its probes run now)
                time_figures, time_tag = predicted_metrics(cfg, env.world_size, probes, build_optimizer,
                                                             matmul_dtype(cfg))
                summary.update(time_figures)
                tags.update(time_tag)
                keep_link(cfg, env.world_size, probes.link if probes else None)  # for the plans that follow
            if MEM_ACTIVATIONS not in summary and cfg.trainer.max_steps > 0:
                tags[UNMEASURED_TAG] = unmeasured_reason(cfg) or "no training step ran"
        summary[MEM_PEAK] = max_over_ranks(peak_memory_bytes(env.device, held), env.device)
        summary.update(peak_reserved_memory(env.device, held))
        log_summary(logger, summary, tags, cfg)
    finally:
        if logger is not None:
            logger.close()


def build_data(cfg: DictConfig, env: DistEnv) -> tuple[Codec, ByteCorpus]:
    """The codec (bytes, or the tokenizer of a Hugging Face model's folder) and the tokenized corpus."""
    say(env, f"loading data ({cfg.data.get('name', 'data')})")
    codec = load_codec(cfg.model)
    return codec, tokenize_corpus(build_corpus(cfg.data), codec)


def build_model_to_train(cfg: DictConfig, env: DistEnv) -> tuple[torch.nn.Module, float]:
    """The model, from ``trainer.init_from`` when set, as the ``finetune`` option trains it (LoRA: adapters
    injected, the rest frozen; QLoRA: the adapted weights in NF4 too), and its training FLOPs per token (of the
    base model's forward and backward)."""
    say(env, f"building {cfg.model.get('name', 'the model')} and parallelising it "
             f"({cfg.parallelism.get('name', '')}, {env.world_size} rank(s))")
    model = build_model(cfg.model)
    flops = flops_per_token(model, cfg.model.block_size)  # of the whole model, before any sharding
    if cfg.trainer.get("init_from"):
        load_init(model, cfg)
    shards = parallel_dims(cfg.parallelism, env.world_size).dp_shard  # an NF4 base is cut for FSDP's shards
    return apply_finetune(model, cfg, shards=shards), flops


def train_time_hooks(model: torch.nn.Module, cfg: DictConfig) -> list[Callable[[int], None]]:
    """The step hooks of train-time compression (gradual pruning, QAT); they act on the plain module, so
    they are made before any wrapper holds it."""
    options = (build_pruning(cfg), build_quantization(cfg))
    return [h for h in (o.training_hook(model, cfg) for o in options) if h is not None]


def open_logger(cfg: DictConfig, env: DistEnv, stop: StopWatcher | None) -> MetricLogger | None:
    """Rank 0's logger, into the run folder, which run.py relays into MLflow; a restarted or resumed attempt
    re-runs some steps, and the relay logs each step once. A stop that cannot wait flushes it."""
    logger = MetricLogger(cfg.runtime.run_dir) if env.is_main else None
    if logger is not None and stop is not None:
        stop.on_timeout.append(logger.flush)
    return logger


def training_summary(result: TrainResult, predicted: dict[str, float] | None, env: DistEnv) -> dict[str, float]:
    """The state bytes each rank held (the largest over ranks) and the fault and checkpoint figures; on GPU,
    the memory model checked against the allocator's peak in training (into ``predicted``). Collectives:
    every rank calls it."""
    if env.device.type == "cuda":
        measured = max_over_ranks(peak_memory_bytes(env.device), env.device)
        total = predicted_peak(predicted or {})
        if total and measured:
            predicted[PREDICTED_OVER_MEASURED] = total / measured
    summary = {k: max_over_ranks(v, env.device) for k, v in result.state_bytes.items()}
    if result.activations_bytes is not None:  # measured on every rank or on none (unmeasured_reason)
        summary[MEM_ACTIVATIONS] = max_over_ranks(result.activations_bytes, env.device)
    if result.allocated_bytes is not None:  # on CPU, with the activations, where glibc's allocator can be read
        summary[MEM_STEP_ALLOCATED] = max_over_ranks(result.allocated_bytes, env.device)
    summary.update(result.fault)
    return summary


def training_metrics(result: TrainResult, corpus: ByteCorpus, cfg: DictConfig) -> dict[str, float]:
    """Rank 0: throughput over the timed steps, the final training loss and the data's figures."""
    out = result.stats.summary()
    out["data/bytes_per_token"] = corpus.bytes_per_token
    if corpus.entropy_floor is not None:
        out["data/entropy_floor"] = corpus.entropy_floor
    if cfg.trainer.max_steps > 0:  # a run that only compresses a loaded model trains nothing
        out["train/final_loss"] = result.final_loss
    return out


def compress_and_evaluate(final: torch.nn.Module, corpus: ByteCorpus, codec: Codec, cfg: DictConfig, env: DistEnv,
                          counter: Callable[[], float] | None) -> tuple[dict[str, float], dict[str, str]]:
    """Rank 0, while the other ranks wait: the trained model compressed (if asked), measured and saved
    (:func:`~costlab.training.evaluation.evaluate_final`), and its inference energy where a counter reads it."""
    if env.device.type == "cpu":
        # the final model is measured on the node's whole CPU, so its inference figures do not depend on
        # the world size it was trained with
        torch.set_num_threads(os.cpu_count() or 1)
    run_dir = Path(cfg.runtime.run_dir)
    say(env, "compressing (if asked), measuring quality, size and inference speed, saving the model")
    metrics, tags = evaluate_final(final, corpus, cfg, env, run_dir)
    tags[TOKENIZER_TAG] = codec.name
    if counter is not None:
        metrics[ENERGY_INFER] = inference_energy(final, infer_batch(corpus, cfg, env.device), counter,
                                                 lambda: autocast(cfg, env.device))
    tags[CHECKPOINT_TAG] = str(trained_model_file(run_dir))  # what trainer.init_from=<this run id> starts from
    # the options say whether they acted during training: the report then compares this run's training
    levers = (build_pruning(cfg), build_quantization(cfg))
    tags[COMPRESSES_IN_TRAINING] = str(any(o.acts_during_training for o in levers)).lower()
    return metrics, tags


def log_summary(logger: MetricLogger | None, summary: dict[str, float], tags: dict[str, str],
                cfg: DictConfig) -> None:
    """Rank 0: the run's tags and summary metrics (at the last step) into the run folder, and the summary on
    the console."""
    if logger is None:
        return
    logger.set_tags(tags)
    summary["tracking/log_overhead_s"] = logger.time_spent_s
    logger.log(summary, cfg.trainer.max_steps)
    print("summary:\n" + "\n".join(f"  {k:<34} {v:.6g}" for k, v in sorted(summary.items())), flush=True)


def close_if_orphaned(cfg: DictConfig) -> None:
    """Rank 0, stopping: if the run.py that owns the run is gone (killed outright), nobody else will close
    the run, so it is closed FAILED now, with the reason, by a launcher-side process (the ranks never
    import MLflow): ``python -m costlab.tracking.relay`` relays what run.py had not, then closes the run."""
    launcher = os.environ.get(LAUNCHER_ENV)
    run_id = cfg.runtime.get("run_id") or status.run_id_of(Path(cfg.runtime.run_dir))
    if not launcher or alive(launcher) or not run_id:
        return
    import subprocess

    cmd = [sys.executable, "-m", "costlab.tracking.relay", str(cfg.tracking.uri), str(run_id), str(cfg.runtime.run_dir)]
    try:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=WORKER_GRACE_S - 1, check=True)
    except (OSError, subprocess.SubprocessError) as e:  # run.py's next start closes it (tracking.close_orphans)
        print(f"costlab: could not close run {run_id}: {e}", file=sys.stderr, flush=True)
        return
    print(f"costlab: run.py (pid {launcher.split(':')[0]}) is gone; run {run_id} closed FAILED",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m costlab.training RUN_DIR/config.yaml")
    cfg = OmegaConf.load(argv[0])
    quiet_third_party_notes()
    die_with_parent()  # torchrun killed outright: this worker gets SIGTERM rather than running on
    stop = StopWatcher().start()
    record_worker(Path(cfg.runtime.run_dir), cfg.trainer.node_rank, int(os.environ.get("LOCAL_RANK", 0)))
    main_rank = cfg.trainer.node_rank == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
    try:
        if main_rank:
            predicted = predict(cfg)
        else:
            warm_up(cfg)
            predicted = {}
        env = init_distributed(cfg)
        run(cfg, env, predicted, stop)
    except Stopped as e:
        if main_rank:
            close_if_orphaned(cfg)
        raise SystemExit(128 + e.signum) from None
    except torch.cuda.OutOfMemoryError:
        # "does not fit" is a result a sweep can show: the run ends FAILED with the reason as a tag
        if cfg.trainer.node_rank == 0:  # run.py relays it from this node's run folder
            from costlab.events import FAILURE_TAG

            record_tags(cfg.runtime.run_dir, {FAILURE_TAG: "oom"})
        raise
    except BaseException:
        if main_rank:
            close_if_orphaned(cfg)
        raise
    if dist.is_initialized():
        # leave together: a gloo rank that tears down while its peer is still connected can abort
        dist.barrier()
        dist.destroy_process_group()
    exit_now(0)  # the interpreter's teardown of torch and the rest takes seconds and does nothing a run needs


def warm_up(cfg: DictConfig) -> None:
    """What the other ranks do while the main one predicts (:func:`predict`, before any rank joins the process
    group): the imports their run needs, which each rank would otherwise pay for in turn while its peers wait in a
    collective, the main rank having paid for them in its prediction. The model built on the meta device, as the
    ``finetune`` option adapts it (a Hugging Face family's modules, PEFT, the NF4 backend), as the prediction builds
    it, then DTensor and TorchDynamo, which the layouts import on first use: 3 s of a 2-rank Hugging Face run on 2
    cores, 1 s of a GPT's. Nothing is allocated and nothing random drawn."""
    import torch._dynamo  # noqa: F401  (DTensor's distribute_module imports it on first use)
    import torch.distributed.tensor  # noqa: F401

    from costlab.models.meta import on_meta

    try:
        with on_meta():
            apply_finetune(build_model(cfg.model), cfg)
    except Exception:  # only a head start: the run builds the model next, and says there what fails
        pass


def predict(cfg: DictConfig) -> dict[str, float]:
    """The memory model's per-rank state bytes, before joining the process group (the prediction lays the
    model out under a fake one). A layout it cannot lay out costs the run its prediction only."""
    try:
        world = int(cfg.runtime.world_size)
        predicted = predict_state(cfg, world)
        if cfg.trainer.device != "cuda" and malloc_meter() and not unmeasured_reason(cfg):  # measured beside it
            predicted[STEP_ALLOCATED] = step_allocated_bytes(cfg, world, predicted)
        return predicted
    except Exception as e:
        print(f"costlab: no memory prediction: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return {}
