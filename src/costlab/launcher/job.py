"""The launcher side of a run: validate, write the resolved config, open the MLflow run, start
torchrun, wait, and close the run with the status the workers earned.

It never imports torch: starting a sweep must stay cheap and must never initialise CUDA.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from costlab import faults, status, tracking
from costlab.errors import ConfigError
from costlab.events import events_path
from costlab.files import write_whole
from costlab.launcher.objective import BASIC_SWEEPER, Objective, directions, objective, refuse_trial
from costlab.launcher.plan import check_plan
from costlab.launcher.resources import check_resources, describe_kill, oom_kill_count
from costlab.launcher.resume import resume_target
from costlab.launcher.torchrun import from_slurm, job_prefix, launch_torchrun
from costlab.launcher.validate import validate
from costlab.measure.hardware import HARDWARE_TAG, resolve_hardware, run_cost
from costlab.measure.machine import cpu_info, resolve_device
from costlab.measure.probes import slow_precision_warning
from costlab.tracking.find import RUN_DIR_TAG, resolve_init_from
from costlab.tracking.runs import check_tracking

ERROR_TAIL_LINES = 80


def fail(error: ConfigError, run_dir: Path, node_rank: int, parent_id: str | None, uri: str | None) -> NoReturn:
    """Refuse a config: one line, exit 2. The job's status file says FAILED and a sweep's parent run is
    closed, so nothing stays RUNNING whichever process the launcher ran this job in."""
    status.write(run_dir, status.FAILED, node_rank=node_rank, parent_run_id=parent_id)
    if parent_id and uri:
        tracking.client(uri).set_terminated(parent_id, status.FAILED)
    status.refuse(error)


def _tags(cfg: DictConfig, choices: dict[str, str], world_size: int) -> dict[str, str]:
    tags = {group: str(choices.get(group, cfg[group].get("name", ""))) for group in tracking.CONTRACT_TAGS}
    tags.update(world_size=str(world_size), device=cfg.trainer.device)
    tags[HARDWARE_TAG] = str(cfg.hardware.name)
    tags.update(cpu_info().tags())  # which CPU levers pay depends on these features
    return tags


def default_run_name(tags: dict[str, str], overrides: list[str] = (), varied: list[str] = ()) -> str:
    """``gpt_nano single fp32 x1``, plus the compression options when there are any, plus the other
    overrides a sweep varies (``trainer.lr=0.001``), so the jobs of a search are told apart."""
    parts = [tags["model"], tags["parallelism"], tags["precision"], f"x{tags['world_size']}"]
    parts += [tags[g] for g in ("pruning", "quantization") if tags[g] != "none"]
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in varied and key not in ("model", "parallelism", "precision", "pruning", "quantization"):
            parts.append(override.lstrip("+~"))
    return " ".join(parts)


def run_job(cfg: DictConfig) -> Objective:
    """The Hydra task: one job of a run or of a sweep. Returns its ``optimized_metric`` (see :func:`objective`).

    The job's status is written into its folder (:mod:`costlab.status`), where the sweep's parent and
    ``run.py``'s exit code read it back whichever process or machine the launcher ran this job on.
    """
    faults.check_interrupted()  # a stop signal whose exception Python dropped ends the sweep here
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    parent_id = tracking.parent_run_id(hc.sweep.dir) if multirun else None
    run_dir = Path(hc.runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    planning = cfg.get("mode", "train") == "plan"
    resumed_id = None
    try:
        if cfg.get("mode", "train") not in ("train", "plan"):
            raise ConfigError("mode", cfg.mode, "choose train or plan")
        if cfg.trainer.get("resume") and not planning:
            check_tracking(cfg)
            cfg, resumed_id = resume_target(cfg, list(hc.overrides.task))
            run_dir = Path(cfg.runtime.run_dir)  # the run goes on in its own folder
        with open_dict(cfg):
            # a plan runs nothing here: it is checked as a CPU job, and priced on the hardware it names
            cfg.trainer.device = "cpu" if planning else resolve_device(cfg.trainer.device)
            cfg.hardware = resolve_hardware(cfg, planning)
            from_slurm(cfg, os.environ)
        validate(cfg)
        if planning:
            check_plan(cfg)
        else:
            for line in check_resources(cfg):
                print(f"costlab: warning: {line}", file=sys.stderr, flush=True)
        if cfg.trainer.node_rank == 0:  # other nodes never touch the store
            # a training job checks the store here and opens it while its ranks start (see open_store)
            check_tracking(cfg, store_only=not planning and resumed_id is None)
    except ConfigError as e:
        return refuse(cfg, e, run_dir, parent_id, hc)

    warning = None if planning else slow_precision_warning(cfg, cpu_info())
    if warning:
        print(warning, file=sys.stderr, flush=True)

    if planning:
        outcome, run_id = run_plan(cfg, run_dir, parent_id, hc)
        return objective(cfg, outcome, run_id, directions(hc))

    t0 = time.time()
    if cfg.trainer.node_rank > 0:
        return objective(cfg, run_follower(cfg, run_dir, parent_id), None, directions(hc))
    # written before anything can fail, so a job killed outright still leaves a trace that it did not finish;
    # it also clears the run id a previous job in this folder recorded (the ranks read it from here)
    status.write(run_dir, status.RUNNING, node_rank=0, parent_run_id=parent_id)
    world_size = cfg.trainer.nnodes * cfg.trainer.nproc_per_node
    with open_dict(cfg):
        ended_at = cfg.get("runtime", {}).get("ended_at") if resumed_id else None
        cfg.runtime = runtime(cfg, run_dir, resumed_id, ended_at)
    config_path = run_dir / "config.yaml"
    write_config(config_path, cfg)
    log_path = run_dir / "worker.log"
    events_offset = events_path(run_dir).stat().st_size if events_path(run_dir).exists() else 0
    job: dict[str, Any] = {}  # the run and its relay, once open_store has opened them

    def open_store() -> None:
        """The launcher's MLflow work, done while torchrun and the ranks start: importing MLflow and opening
        the store take seconds, as do torch's imports in the ranks, and a 2-core machine does both at once."""
        if resumed_id is None:
            check_tracking(cfg)
        tags = _tags(cfg, dict(hc.runtime.choices), world_size)
        sweep = tracking.sweep_info(hc.sweep.dir) if multirun else {}
        name = cfg.tracking.run_name or default_run_name(tags, list(hc.overrides.task), sweep.get("varied", []))
        tags[RUN_DIR_TAG] = str(run_dir)
        if resumed_id:
            run_id = tracking.reopen_run(cfg.tracking.uri, resumed_id)
            name = tracking.client(cfg.tracking.uri).get_run(run_id).info.run_name
        else:
            run_id = tracking.open_run(cfg, tags, name, parent_id, sweep.get("name"))
        job["run_id"] = run_id
        status.write(run_dir, status.RUNNING, node_rank=0, run_id=run_id, parent_run_id=parent_id)  # the ranks read it
        with open_dict(cfg):
            cfg.runtime.run_id = run_id
        write_config(config_path, cfg)  # a rank torchrun restarts reads it from here
        job["relay"] = tracking.Relay(cfg.tracking.uri, run_id, run_dir, resumed=bool(resumed_id), offset=events_offset)
        tracking.client(cfg.tracking.uri).log_artifact(run_id, str(config_path))
        # said as soon as the run exists, so it can be found (and watched in MLflow) while it trains
        print(f"costlab: run {run_id} '{name}' starting {world_size} rank(s) in {run_dir}", file=sys.stderr, flush=True)

    outcome = status.FAILED
    ooms = oom_kill_count()
    try:
        rc = launch_torchrun(cfg, config_path, log_path, job_prefix(hc), while_starting=open_store)
        outcome = status.FINISHED if rc == 0 else status.FAILED
    except ConfigError as e:  # the store, checked fully while the ranks started (which are stopped)
        return refuse(cfg, e, run_dir, parent_id, hc)
    except KeyboardInterrupt:
        outcome = status.KILLED
    finally:
        if "run_id" in job:
            outcome = close_run(cfg, job, outcome, t0, ooms, log_path, parent_id)
        else:  # stopped before the run existed: only the status file has anything to say
            status.write(run_dir, outcome, node_rank=0, parent_run_id=parent_id)
    if outcome == status.KILLED:
        raise KeyboardInterrupt
    print(f"costlab: run {job['run_id']} {outcome} in {time.time() - t0:.1f}s ({run_dir})", file=sys.stderr)
    return objective(cfg, outcome, job["run_id"], directions(hc))


def runtime(cfg: DictConfig, run_dir: Path, run_id: str | None, ended_at: float | None = None) -> dict[str, Any]:
    """What the ranks need beyond the config: where the run lives, its MLflow run (when known), the world
    size, and ``trainer.init_from`` resolved into the file to load (a run id is looked up here, so the
    ranks never ask MLflow)."""
    init_from = cfg.trainer.get("init_from")
    return {"run_id": run_id, "run_dir": str(run_dir), "world_size": cfg.trainer.nnodes * cfg.trainer.nproc_per_node,
            "ended_at": ended_at,
            "init_from": str(resolve_init_from(init_from, cfg.tracking.uri)) if init_from else None}


def write_config(path: Path, cfg: DictConfig) -> None:
    """The resolved config the ranks read, replaced whole: a rank starting meanwhile reads one or the other."""
    write_whole(path, OmegaConf.to_yaml(cfg, resolve=True))


def refuse(cfg: DictConfig, error: ConfigError, run_dir: Path, parent_id: str | None, hc: DictConfig) -> Objective:
    """A refused config: a trial of a search fails and the search goes on; anything else exits 2."""
    node = cfg.trainer.node_rank
    if hc.mode == RunMode.MULTIRUN and node == 0 and hc.sweeper.get("_target_") != BASIC_SWEEPER:
        tags = _tags(cfg, dict(hc.runtime.choices), cfg.trainer.nnodes * cfg.trainer.nproc_per_node)
        return refuse_trial(cfg, error, run_dir, parent_id, tags, hc)
    fail(error, run_dir, node, parent_id, cfg.tracking.uri if parent_id and node == 0 else None)


def close_run(cfg: DictConfig, job: dict[str, Any], outcome: str, t0: float, ooms: int | None, log_path: Path,
              parent_id: str | None) -> str:
    """Relay the last of what rank 0 recorded, log the job's wall time, cost and log, and close the run with
    its outcome (FAILED when part of its record could not be written). Returns the outcome."""
    run_id, run_dir = job["run_id"], log_path.parent
    client = tracking.client(cfg.tracking.uri)
    try:
        lost = job["relay"].close() if "relay" in job else None
        if lost is not None:
            print(f"costlab: run {run_id}: metric logging failed: {lost}", file=sys.stderr, flush=True)
            client.set_tag(run_id, tracking.ERROR_TAG, f"metric logging failed: {lost}"[:5000])
            if outcome == status.FINISHED:
                outcome = status.FAILED  # a run whose record is incomplete did not finish as recorded
        oom = describe_kill(ooms, oom_kill_count()) if outcome == status.FAILED else None
        if oom:
            print(f"costlab: run {run_id}: {oom}", file=sys.stderr, flush=True)
            client.set_tag(run_id, tracking.FAILURE_TAG, "oom")
            client.set_tag(run_id, tracking.ERROR_TAG, oom)
        seconds = time.time() - t0
        client.log_batch(run_id, metrics=tracking.metrics_at({"time/total_s": seconds, **run_cost(cfg, seconds)}))
        if log_path.exists():
            client.log_artifact(run_id, str(log_path))
        if outcome != status.FINISHED and log_path.exists():
            tail = run_dir / "error_tail.txt"
            tail.write_text("".join(deque(log_path.open(errors="replace"), maxlen=ERROR_TAIL_LINES)))
            client.log_artifact(run_id, str(tail))
    finally:
        client.set_terminated(run_id, outcome)
        status.write(run_dir, outcome, node_rank=0, run_id=run_id, parent_run_id=parent_id)
        if outcome == status.KILLED and parent_id:
            client.set_terminated(parent_id, status.KILLED)
    return outcome


def run_plan(cfg: DictConfig, run_dir: Path, parent_id: str | None, hc: DictConfig) -> tuple[str, str]:
    """``mode=plan``: predict, print, and log the plan as a FINISHED run tagged ``mode=plan``; no worker.
    Returns the outcome and the run's id."""
    from costlab.launcher.plan import make_plan, print_plan

    world = cfg.trainer.nnodes * cfg.trainer.nproc_per_node
    tags = {**_tags(cfg, dict(hc.runtime.choices), world), "mode": "plan"}
    sweep = tracking.sweep_info(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else {}
    name = cfg.tracking.run_name or "plan " + default_run_name(tags, list(hc.overrides.task), sweep.get("varied", []))
    run_id = tracking.open_run(cfg, tags, name, parent_id, sweep.get("name"))
    outcome = status.FAILED
    try:
        metrics, lines = make_plan(cfg)
        print_plan(lines)
        client = tracking.client(cfg.tracking.uri)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        (run_dir / "plan.txt").write_text("\n".join(lines) + "\n")
        client.log_artifact(run_id, str(run_dir / "plan.txt"))
        outcome = status.FINISHED
    finally:
        tracking.client(cfg.tracking.uri).set_terminated(run_id, outcome)
        status.write(run_dir, outcome, node_rank=0, run_id=run_id, parent_run_id=parent_id)
    return outcome, run_id


def run_follower(cfg: DictConfig, run_dir: Path, parent_id: str | None) -> str:
    """A node other than node 0 of a multi-node job: start this node's torchrun and wait.

    Node 0's run.py owns the MLflow run and its rank 0 logs every metric; this node opens no run,
    logs nothing and reports only through its status file and exit code. Its files carry the node
    rank, so a run folder shared between nodes (SLURM on a shared file system) holds each node's
    config, log and status.
    """
    t0 = time.time()
    node = cfg.trainer.node_rank
    with open_dict(cfg):
        cfg.runtime = runtime(cfg, run_dir, None)
    config_path = run_dir / f"config.node{node}.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    status.write(run_dir, status.RUNNING, node_rank=node, parent_run_id=parent_id)
    outcome = status.FAILED
    try:
        rc = launch_torchrun(cfg, config_path, run_dir / f"worker.node{node}.log", job_prefix(HydraConfig.get()))
        outcome = status.FINISHED if rc == 0 else status.FAILED
    except KeyboardInterrupt:
        outcome = status.KILLED
        raise
    finally:
        status.write(run_dir, outcome, node_rank=node, parent_run_id=parent_id)
    print(f"costlab: node {node} {outcome} in {time.time() - t0:.1f}s ({run_dir})", file=sys.stderr)
    return outcome
