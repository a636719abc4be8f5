"""A plan's probes on this CPU (:func:`plan_cpu_rates`): the run's rates beside companion processes
(:mod:`costlab.measure.companions`), the run's own model plain, its layout's wrapping and a pipeline's schedule as
the layout's ranks would run them, each alone under PyTorch's fake process group, and the link that runs of as
many ranks here kept (:func:`cached_link`); :func:`plan_gaps` says what such a plan could not price."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from costlab.measure.companions import beside_peers
from costlab.measure.stepprobes import (
    RankProbes,
    cpu_rates,
    layout_seconds,
    plain_model_seconds,
    run_shapes,
    schedule_seconds,
    with_threads,
)
from costlab.measure.timemodel import ModelProbe, Rates, layout_calls


def local_probes(cfg: DictConfig, world: int, build_optimizer: Any = None) -> RankProbes:
    """:class:`RankProbes` of one process, for a plan on this CPU: the run's matmul shapes with this process's
    share of the cores (``trainer.nproc_per_node`` ranks share them; at most :data:`PLAN_MATMUL_TOKENS` of a
    micro-batch's tokens), ops, views and a copy, timed while companion processes time the same as the node's other
    ranks would (:func:`beside_peers`); no link (no peers: :func:`plan_cpu_rates` takes the one runs kept). With
    ``build_optimizer`` (the trainer's) also the run's own model plain on one rank's micro-batch at two depths
    (:func:`local_model`), as a run probes it (a small model's step is its ops' fixed costs more than its matmuls),
    and FSDP's, tensor parallel's or DDP's wrapping as rank 0 of the layout runs it under a fake process group
    (:func:`local_layout`; a pipeline's, its stages' optimizer step alone), and a pipeline's schedule as the ranks
    of its first and last stages run it there (:func:`local_schedule`)."""
    from costlab.measure.memory import _depth
    from costlab.parallelism.dims import parallel_dims

    share = local_share(cfg)
    times, _ = _plan_rank_times(cfg, world)
    model = local_model(cfg, world, share, build_optimizer) if build_optimizer and _depth(cfg) is not None else None
    dims = parallel_dims(cfg.parallelism, world)
    # as :func:`probe_ranks`: a pipeline stage's wrapping per micro-batch is in the schedule's probe
    sharded = dims.fsdp_enabled or dims.tp_enabled
    wrapped = model is not None and (sharded or (dims.ddp_enabled and not dims.pp_enabled))
    layout = local_layout(cfg, world, share, build_optimizer) if wrapped else None
    layer_s, outside_s, step_s, calls = layout or (0.0, 0.0, 0.0, {})
    if dims.pp_enabled:  # its stages' collectives are in its schedule's probe, uncounted (the link model's)
        layer_s, outside_s, calls = 0.0, 0.0, {}
    schedule = local_schedule(cfg, world, share, build_optimizer) if model is not None and dims.pp_enabled else None
    return RankProbes(1 / times[0], times[1], times[2], 1 / times[3], None,
                      policy_op_s=times[4], step_op_s=times[5], layout_layer_s=layer_s, layout_outside_s=outside_s,
                      layout_step_s=step_s, layout_calls=dict(calls), model=model, layout_peers=False,
                      layout_probed=layout is not None,
                      schedule_s=schedule or 0.0, schedule_probed=schedule is not None)


PLAN_MATMUL_TOKENS = 2048  # a plan times its matmul shapes on at most this many tokens (the rate has levelled off)


def _plan_rank_times(cfg: DictConfig, world: int) -> tuple[list[float], int]:
    """A plan's :func:`rank_times` on this CPU beside its node's other ranks (:func:`beside_peers`), and how many
    companion processes timed beside it."""
    selective = cfg.trainer.get("activation_checkpointing", "none") == "selective"
    tokens, *shapes = run_shapes(cfg, world)
    threads, peers = local_share(cfg), local_peers(cfg, world)
    matmul, timed = _local_times(threads, peers, "matmul_seconds", min(tokens, PLAN_MATMUL_TOKENS), *shapes)
    fixed, _ = _local_times(threads, peers, "fixed_times", selective)  # the same for every candidate of a search
    return matmul + fixed, timed


def local_share(cfg: DictConfig) -> int:
    """The threads one rank of the run has on this machine: its cores shared by ``trainer.nproc_per_node`` ranks."""
    import os

    return max(1, (os.cpu_count() or 1) // int(cfg.trainer.nproc_per_node))


def plan_cpu_rates(cfg: DictConfig, world: int, build_optimizer: Any = None) -> Rates:
    """A plan's rates on this CPU: :func:`local_probes` (with the run's model, and its layout's wrapping, where
    ``build_optimizer`` is given), their source saying they were probed in this one process, and the link that runs
    of ``world`` ranks here kept (:func:`cached_link`), where one did."""
    import os

    probes = local_probes(cfg, world, build_optimizer)
    companions = _plan_rank_times(cfg, world)[1]
    where = f"in this one process with {local_share(cfg)} of this machine's {os.cpu_count()} cores" + (
        f" (its rates timed while {companions} companion process{'es' if companions > 1 else ''} timed the same, as "
        "the node's other ranks would, the slowest's figures)" if companions else "")
    rates = cpu_rates(cfg, probes, where)
    kept = cached_link(cfg, world)
    if kept:
        rates.link = kept[0]
        rates.source += f"; the link the median of the probes of {kept[1]} earlier runs of {world} ranks here"
    return rates


def _link_cache(cfg: DictConfig) -> tuple[Any, Any]:
    """(the file a CPU's probes are kept in, or None; this CPU)."""
    from pathlib import Path

    from costlab.measure.machine import cpu_info

    cache = cfg.hardware.get("probe_cache")
    return (Path(cache) if cache else None), cpu_info()


def cached_link(cfg: DictConfig, world: int) -> tuple[dict[str, tuple[float, float]], int] | None:
    """The link between ``world`` ranks on this machine that earlier runs probed and kept (the median of the last
    few, and how many: :func:`costlab.measure.probes.cached_link`), for a plan of one node; None where none did, or
    the plan spans nodes (no run here crosses their network)."""
    from costlab.measure.probes import cached_link as kept

    if world <= 1 or int(cfg.trainer.nnodes) > 1:
        return None
    return kept(*_link_cache(cfg), world)


def keep_link(cfg: DictConfig, world: int, link: dict[str, tuple[float, float]] | None) -> None:
    """Keep a CPU run's link probe (:func:`link_probe`) of ``world`` ranks in one node beside the CPU's peak, for
    the plans that follow (:func:`cached_link`)."""
    from costlab.measure.probes import remember_link

    if link and int(cfg.trainer.nnodes) == 1 and cfg.trainer.device == "cpu":
        remember_link(*_link_cache(cfg), world, link)


def plan_gaps(cfg: DictConfig, world: int, rates: Rates) -> list[str]:
    """What a plan on this CPU of ``world`` ranks could not price, or priced without the layout's peers, and why."""
    from costlab.parallelism.dims import parallel_dims

    if world <= 1:
        return []
    dims = parallel_dims(cfg.parallelism, world)
    gaps = []
    if not rates.link:
        gaps.append("collectives not priced: " + (
            "a plan has no peers, and no run here crosses the network between nodes"
            if int(cfg.trainer.nnodes) > 1 else
            f"no run of {world} ranks on this machine has probed its link yet (one that does keeps it in "
            "hardware.probe_cache)"))
    if dims.pp_enabled and rates.schedule_probed:
        gaps.append("the pipeline's schedule probed as the ranks of its first and last stages run it, without their "
                    "peers: their waiting for one another is not priced (a run of the layout probes it)")
    elif dims.pp_enabled and rates.model:  # its schedule's probe failed
        gaps.append("the pipeline schedule's fixed costs not priced: its probe under a fake process group failed "
                    "here (the warning on stderr says why)")
    elif dims.pp_enabled:
        gaps.append(f"the pipeline schedule's fixed costs not priced: probed only for a model whose step is under "
                    f"{MODEL_PROBE_S} s and that fits this machine")
    elif rates.layout_probed:
        gaps.append("the layout's wrapping probed as its rank 0 runs it, without its peers: its collectives counted "
                    "there, each priced at the link's latency within a step that runs kept; the model and its wrapping "
                    "timed alone, without the ranks' contention for the cores (a run of the layout probes it)")
    elif rates.model and (dims.fsdp_enabled or dims.tp_enabled or dims.ddp_enabled):  # its wrapping's probe failed
        gaps.append("the layout's wrapping not priced: its probe under a fake process group failed here (the warning "
                    "on stderr says why)")
    elif dims.fsdp_enabled or dims.tp_enabled or dims.ddp_enabled:
        gaps.append(f"the layout's wrapping not priced (DDP's: its all-reduce alone): probed only for a model whose "
                    f"step is under {MODEL_PROBE_S} s and that fits this machine")
    return gaps


MODEL_PROBE_S = 1.0  # a CPU plan probes the run's own model (and its layout) where its step is predicted under this


@dataclass(frozen=True)
class _ModelProbeAsk:
    """What :func:`local_model` asks for: hashed and compared on ``key`` alone (its config and optimizer ride along)."""

    key: tuple
    threads: int = field(compare=False, hash=False)  # part of ``key``
    cfg: Any = field(compare=False, hash=False)
    world: int = field(compare=False, hash=False)
    build_optimizer: Any = field(compare=False, hash=False)


def local_model(cfg: DictConfig, world: int, threads: int, build_optimizer: Any) -> ModelProbe:
    """:class:`ModelProbe` of the run's model plain on one rank's micro-batch with ``threads`` threads, in this
    process (:func:`depth_seconds`, no peers), once per process for each model, micro-batch, precision, fine-tune,
    optimizer and checkpointing (a search asks for every candidate; the layout does not change a plain model)."""
    key = _probe_key(cfg, threads, run_shapes(cfg, world)[0])
    return _probe_model(_ModelProbeAsk(key, threads, cfg, world, build_optimizer))


def _probe_key(cfg: DictConfig, *what: Any, groups: tuple[str, ...] = ()) -> tuple:
    """What a probe of the run's own model depends on: ``what`` (its threads, micro-batch...), the model, precision,
    fine-tune and optimizer options and ``groups``, checkpointing and clipping."""
    nodes = {k: cfg.get(k) for k in ("model", "precision", "finetune", "optimizer", *groups)}
    return (*what, json.dumps(OmegaConf.to_container(OmegaConf.create(nodes), resolve=True), sort_keys=True),
            str(cfg.trainer.get("activation_checkpointing", "none")), float(cfg.trainer.grad_clip or 0.0))


@functools.lru_cache(maxsize=64)
def _probe_model(ask: _ModelProbeAsk) -> ModelProbe:
    layer, outside, per_flop = with_threads(ask.threads, lambda: plain_model_seconds(
        ask.cfg, ask.world, ask.build_optimizer, at_once=False))
    return ModelProbe(layer, outside, 1 / per_flop)


def local_layout(cfg: DictConfig, world: int, threads: int,
                 build_optimizer: Any) -> tuple[float, float, float, dict[str, tuple[float, float, float]]] | None:
    """:func:`layout_seconds` of the layout's FSDP, tensor-parallel or DDP wrapping as its rank 0 runs it with
    ``threads`` threads, in this process under PyTorch's fake process group (:func:`fake_group`: real shards and
    splits, each collective local; DDP's hooks and bucket copies, its all-reduce local: :func:`_local_all_reduce`),
    and the collectives it issues (:func:`layout_calls`), once per process for each layout, model, precision,
    fine-tune, optimizer and checkpointing (it runs on one short row, whatever the micro-batch); None, said on
    stderr, where it cannot run here."""
    return _lone_probe("the layout's wrapping", _probe_layout, cfg, world, threads, build_optimizer)


@functools.lru_cache(maxsize=64)
def _probe_layout(ask: _ModelProbeAsk) -> tuple[float, float, float, dict[str, tuple[float, float, float]]]:
    from costlab.parallelism.apply import fake_group

    counted: dict = {}
    with fake_group(0, ask.world):
        seconds = with_threads(ask.threads, lambda: layout_seconds(ask.cfg, ask.world, ask.build_optimizer,
                                                                     counted))
    return (*seconds, layout_calls(ask.cfg, ask.world, counted))


def local_schedule(cfg: DictConfig, world: int, threads: int, build_optimizer: Any) -> float | None:
    """:func:`schedule_seconds` of the layout's pipeline schedule as the ranks of its first and of its last stage
    each run it alone with ``threads`` threads, the larger (the first embeds, the last holds the head and the loss),
    in this process under PyTorch's fake process group (its stages' shapes given, not exchanged:
    :func:`costlab.parallelism.pp.lone_stages`; each collective and send local, each receive's buffer as it was),
    once per process for each layout, model, precision, fine-tune, optimizer and checkpointing (on one short row per
    micro-batch, whatever the batch); None, said on stderr, where it cannot run here."""
    return _lone_probe("the pipeline's schedule", _probe_schedule, cfg, world, threads, build_optimizer)


def _lone_probe(what: str, probe: Any, cfg: DictConfig, world: int, threads: int, build_optimizer: Any) -> Any:
    """``probe`` of the layout (cached per layout, model, precision, fine-tune, optimizer and checkpointing), or
    None where it cannot run here under the fake process group: that costs the plan ``what`` alone, and stderr
    says why."""
    key = _probe_key(cfg, threads, world, groups=("parallelism",))
    try:
        return probe(_ModelProbeAsk(key, threads, cfg, world, build_optimizer))
    except Exception as e:  # noqa: BLE001 - a probe the fake group cannot run costs the plan that part only
        import sys

        why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        print(f"costlab: plan: {what} could not be probed here ({type(e).__name__}: {why}); it is not priced",
              file=sys.stderr, flush=True)
        return None


@functools.lru_cache(maxsize=64)
def _probe_schedule(ask: _ModelProbeAsk) -> float:
    import torch

    from costlab.parallelism.apply import fake_group
    from costlab.parallelism.core import DistEnv
    from costlab.parallelism.dims import parallel_dims

    dims = parallel_dims(ask.cfg.parallelism, ask.world)
    seconds = []
    for pp_rank in sorted({0, dims.pp - 1}):  # the mesh's outermost dimension: the other degrees' rank 0 of it
        rank = pp_rank * (ask.world // dims.pp)
        env = DistEnv(rank, rank, ask.world, ask.world, torch.device("cpu"))
        with fake_group(rank, ask.world):
            seconds.append(with_threads(ask.threads, functools.partial(schedule_seconds, ask.cfg, env,
                                                                        ask.build_optimizer)))
    return max(seconds)


@functools.lru_cache(maxsize=64)
def _local_times(threads: int, peers: int, probe: str, *args: Any) -> tuple[list[float], int]:
    """:func:`beside_peers` of one of :data:`COMPANION_PROBES`, once per process (a search asks for every
    candidate)."""
    return beside_peers(peers, threads, probe, *args)


def local_peers(cfg: DictConfig, world: int) -> int:
    """The ranks that would share this machine's cores with one rank of the plan: the others of its node."""
    return max(0, min(int(cfg.trainer.nproc_per_node), world) - 1)
