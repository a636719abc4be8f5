"""The launcher side of a run: validate, write the resolved config, start torchrun and open the MLflow run
meanwhile, wait, and close the run with the status the workers earned.

It never imports torch: starting a sweep must stay cheap and must never initialise CUDA.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from costlab import faults, status, tracking
from costlab.events import FAILURE_TAG, events_path
from costlab.files import write_whole
from costlab.launcher.objective import Objective, directions, objective, refuse_trial, searching
from costlab.launcher.resources import check_resources, describe_kill, oom_kill_count
from costlab.launcher.resume import resume_target
from costlab.launcher.torchrun import from_slurm, job_prefix, launch_torchrun
from costlab.launcher.validate import finetune_warnings, resolve_nf4_backend, validate
from costlab.measure.hardware import HARDWARE_TAG, resolve_hardware, run_cost
from costlab.measure.machine import cpu_info, resolve_device
from costlab.measure.names import LADDER_FILE
from costlab.measure.probes import slow_precision_warning
from costlab.models.adapters import holds_nf4
from costlab.schema import BEFORE_GROUPS, ConfigError, check_config
from costlab.tracking.find import RUN_DIR_TAG, resolve_init_from
from costlab.tracking.runs import check_tracking

if TYPE_CHECKING:  # mlflow is imported only once a store is used: it is slow to import
    from mlflow.tracking import MlflowClient

ERROR_TAIL_LINES = 80


def run_job(cfg: DictConfig) -> Objective:
    """The Hydra task: one job of a run or of a sweep. Returns its ``optimized_metric`` (see :func:`objective`).

    The job's status is written into its folder (:mod:`costlab.status`), where the sweep's parent and
    ``run.py``'s exit code read it back whichever process or machine the launcher ran this job on.
    """
    faults.check_interrupted()  # a stop signal whose exception Python dropped ends the sweep here
    job = Job(cfg, HydraConfig.get())
    try:
        job.validate()
    except ConfigError as e:
        return job.refuse(e)
    if job.planning:
        outcome, run_id = run_plan(job.cfg, job.run_dir, job.parent_id, job.hc)
        return job.objective(outcome, run_id)
    job.warn_if_slow()
    if job.cfg.trainer.node_rank > 0:
        return job.objective(run_follower(job.cfg, job.run_dir, job.parent_id), None)
    return job.train()


def check_job(cfg: DictConfig, planning: bool) -> list[str]:
    """What ``run.py`` checks before any rank starts that needs neither the store nor a resumed run: every
    key's type and range, the device and hardware it resolves (in ``cfg``), this node's rank inside SLURM,
    the relations between keys, and (a training job) the machine's memory. Raises :class:`ConfigError`;
    returns the warnings to print."""
    check_config(cfg)
    with open_dict(cfg):
        # a plan runs nothing here: it is checked as a CPU job, and priced on the hardware it names
        cfg.trainer.device = "cpu" if planning else resolve_device(cfg.trainer.device)
        cfg.hardware = resolve_hardware(cfg, planning)
        from_slurm(cfg)
    validate(cfg)
    with open_dict(cfg):
        resolve_nf4_backend(cfg)
    return finetune_warnings(cfg) + ([] if planning else check_resources(cfg))


class Job:
    """One job as its launcher sees it: its config, its folder, its sweep's parent run, and on node 0 the
    MLflow run it owns and the relay that feeds that run what rank 0 records.

    :meth:`validate` refuses what cannot run; :meth:`train` writes the resolved config (:meth:`prepare`),
    starts the ranks and opens the run meanwhile (:meth:`open_run`), waits, and closes the run (:meth:`close`).
    """

    def __init__(self, cfg: DictConfig, hc: DictConfig) -> None:
        self.cfg = cfg
        self.hc = hc
        self.multirun = hc.mode == RunMode.MULTIRUN
        self.parent_id: str | None = tracking.parent_run_id(hc.sweep.dir) if self.multirun else None
        self.run_dir = Path(hc.runtime.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.planning = cfg.get("mode", "train") == "plan"
        self.resumed_id: str | None = None  # the run a resumed job goes on with (trainer.resume)
        self.run_id: str | None = None  # set by open_run
        self.relay: tracking.Relay | None = None  # set by open_run
        self.system: Any = None  # MLflow's system metrics monitor, set by open_run
        self.t0 = time.time()
        self.events_offset = 0  # what events.jsonl held before this job: a resumed run's relay starts after it
        self.ooms_before: int | None = None  # the OOM killer's counter when the ranks started

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "worker.log"

    @property
    def world_size(self) -> int:
        return self.cfg.trainer.nnodes * self.cfg.trainer.nproc_per_node

    def objective(self, outcome: str, run_id: str | None) -> Objective:
        return objective(self.cfg, outcome, run_id, directions(self.hc), warn=searching(self.hc))

    def refuse(self, error: ConfigError) -> Objective:
        return refuse(self.cfg, error, self.run_dir, self.parent_id, self.hc)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a job that cannot run here, before anything starts. Resolves the
        resumed run (and its folder), the device, the hardware and, inside SLURM, this node's rank."""
        check_config(self.cfg)  # every key's type and range (costlab.schema), before anything reads them
        if self.cfg.trainer.resume and not self.planning:
            check_tracking(self.cfg)
            self.cfg, self.resumed_id = resume_target(self.cfg, list(self.hc.overrides.task))
            self.run_dir = Path(self.cfg.runtime.run_dir)  # the run goes on in its own folder
        cfg = self.cfg
        for line in check_job(cfg, self.planning):
            print(f"costlab: warning: {line}", file=sys.stderr, flush=True)
        if cfg.trainer.node_rank == 0:  # other nodes never touch the store
            # a training job checks the store here and opens it while its ranks start (see open_run)
            check_tracking(cfg, store_only=not self.planning and self.resumed_id is None)

    def warn_if_slow(self) -> None:
        warning = slow_precision_warning(self.cfg, cpu_info())
        if warning:
            print(warning, file=sys.stderr, flush=True)

    def train(self) -> Objective:
        """Node 0: write the config, start the ranks and open the run meanwhile, wait, close the run."""
        self.t0 = time.time()
        self.prepare()
        outcome = status.FAILED
        try:
            rc = launch_torchrun(self.cfg, self.config_path, self.log_path, job_prefix(self.hc),
                                 while_starting=self.open_run)
            outcome = status.FINISHED if rc == 0 else status.FAILED
        except ConfigError as e:  # the store, checked fully while the ranks started (which are stopped)
            return self.refuse(e)
        except KeyboardInterrupt:
            outcome = status.KILLED
        finally:
            outcome = self.close(outcome)
        if outcome == status.KILLED:
            raise KeyboardInterrupt
        print(f"costlab: run {self.run_id} {outcome} in {time.time() - self.t0:.1f}s ({self.run_dir})", file=sys.stderr)
        return self.objective(outcome, self.run_id)

    def prepare(self) -> None:
        """Write the job's status (RUNNING) and the resolved config the ranks read, with what they need beyond
        it (:func:`runtime`); note what the run folder and the OOM killer's counter hold before the ranks."""
        # written before anything can fail, so a job killed outright still leaves a trace that it did not finish;
        # it also clears the run id a previous job in this folder recorded (the ranks read it from here)
        status.write(self.run_dir, status.RUNNING, node_rank=0, parent_run_id=self.parent_id)
        with open_dict(self.cfg):
            ended_at = self.cfg.get("runtime", {}).get("ended_at") if self.resumed_id else None
            self.cfg.runtime = runtime(self.cfg, self.run_dir, self.resumed_id, ended_at)
        write_config(self.config_path, self.cfg)
        events = events_path(self.run_dir)
        self.events_offset = events.stat().st_size if events.exists() else 0
        self.ooms_before = oom_kill_count()

    def open_run(self) -> None:
        """The launcher's MLflow work, done while torchrun and the ranks start: importing MLflow and opening
        the store take seconds, as do torch's imports in the ranks, and a 2-core machine does both at once."""
        cfg = self.cfg
        if self.resumed_id is None:
            check_tracking(cfg)
        tags = _tags(cfg, dict(self.hc.runtime.choices), self.world_size)
        sweep = tracking.sweep_info(self.hc.sweep.dir) if self.multirun else {}
        name = cfg.tracking.run_name or default_run_name(tags, list(self.hc.overrides.task), sweep.get("varied", []))
        tags[RUN_DIR_TAG] = str(self.run_dir)
        if self.resumed_id:
            self.run_id = tracking.reopen_run(cfg.tracking.uri, self.resumed_id)
            name = tracking.client(cfg.tracking.uri).get_run(self.run_id).info.run_name
        else:
            self.run_id = tracking.open_run(cfg, tags, name, self.parent_id, sweep.get("name"))
        # the ranks read the run id from the status file, and a rank torchrun restarts from the config too
        status.write(self.run_dir, status.RUNNING, node_rank=0, run_id=self.run_id, parent_run_id=self.parent_id)
        with open_dict(cfg):
            cfg.runtime.run_id = self.run_id
        write_config(self.config_path, cfg)
        self.relay = tracking.Relay(cfg.tracking.uri, self.run_id, self.run_dir, resumed=bool(self.resumed_id),
                                    offset=self.events_offset)
        tracking.client(cfg.tracking.uri).log_artifact(self.run_id, str(self.config_path))
        self.system = tracking.system_metrics(cfg.tracking.uri, self.run_id,
                                              float(cfg.tracking.get("system_metrics_s", 0)), bool(self.resumed_id))
        # said as soon as the run exists, so it can be found (and watched in MLflow) while it trains
        print(f"costlab: run {self.run_id} '{name}' starting {self.world_size} rank(s) in {self.run_dir}",
              file=sys.stderr, flush=True)

    def close(self, outcome: str) -> str:
        """Relay the last of what rank 0 recorded, log the job's wall time, cost and log, and close the run with
        its outcome (FAILED when part of its record could not be written). A job stopped before its run
        existed only writes its status file. Returns the outcome."""
        if self.run_id is None:
            status.write(self.run_dir, outcome, node_rank=0, parent_run_id=self.parent_id)
            return outcome
        client = tracking.client(self.cfg.tracking.uri)
        self._stop_system_metrics()
        try:
            outcome = self._relay_rest(client, outcome)
            self._log_end(client, outcome)
        finally:
            client.set_terminated(self.run_id, outcome)
            status.write(self.run_dir, outcome, node_rank=0, run_id=self.run_id, parent_run_id=self.parent_id)
            if outcome == status.KILLED and self.parent_id:
                client.set_terminated(self.parent_id, status.KILLED)
        return outcome

    def _stop_system_metrics(self) -> None:
        """The system metrics' last samples, before the run is closed; a failure there costs only them."""
        if self.system is None:
            return
        try:
            self.system.finish()
        except Exception as e:  # context for the run's figures, never a reason to lose its record
            print(f"costlab: warning: run {self.run_id}: system metrics stopped badly ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)

    def _relay_rest(self, client: MlflowClient, outcome: str) -> str:
        lost = self.relay.close() if self.relay is not None else None
        if lost is None:
            return outcome
        print(f"costlab: run {self.run_id}: metric logging failed: {lost}", file=sys.stderr, flush=True)
        client.set_tag(self.run_id, tracking.ERROR_TAG, f"metric logging failed: {lost}"[:5000])
        # a run whose record is incomplete did not finish as recorded
        return status.FAILED if outcome == status.FINISHED else outcome

    def _log_model(self, client: MlflowClient) -> None:
        """The shipped model as an MLflow model; a failure is a warning and a tag, not a failed run."""
        from costlab.report.deploy import MODEL_TAG, log_final_model

        try:
            said = log_final_model(client, self.run_id, self.run_dir, self.cfg)
        except Exception as e:  # the run trained and shipped its model.pt: it finished as recorded
            said = f"not logged: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:500]
            print(f"costlab: warning: run {self.run_id}: the MLflow model was {said}", file=sys.stderr, flush=True)
        client.set_tag(self.run_id, MODEL_TAG, said)

    def _log_end(self, client: MlflowClient, outcome: str) -> None:
        oom = describe_kill(self.ooms_before, oom_kill_count()) if outcome == status.FAILED else None
        if oom:
            print(f"costlab: run {self.run_id}: {oom}", file=sys.stderr, flush=True)
            client.set_tag(self.run_id, FAILURE_TAG, "oom")
            client.set_tag(self.run_id, tracking.ERROR_TAG, oom)
        seconds = time.time() - self.t0
        client.log_batch(self.run_id, metrics=tracking.metrics_at({"time/total_s": seconds,
                                                                   **run_cost(self.cfg, seconds)}))
        if (self.run_dir / LADDER_FILE).exists():  # the serving ladder rank 0 measured
            from costlab.report.serving import log_ladder

            log_ladder(client, self.run_id, self.run_dir / LADDER_FILE)
        if outcome == status.FINISHED and self.cfg.tracking.get("log_model", False):
            self._log_model(client)
        if not self.log_path.exists():
            return
        client.log_artifact(self.run_id, str(self.log_path))
        if outcome != status.FINISHED:
            tail = self.run_dir / "error_tail.txt"
            tail.write_text("".join(deque(self.log_path.open(errors="replace"), maxlen=ERROR_TAIL_LINES)))
            client.log_artifact(self.run_id, str(tail))


def fail(error: ConfigError, run_dir: Path, node_rank: int, parent_id: str | None, uri: str | None) -> NoReturn:
    """Refuse a config: one line, exit 2. The job's status file says FAILED and a sweep's parent run is
    closed, so nothing stays RUNNING whichever process the launcher ran this job in."""
    status.write(run_dir, status.FAILED, node_rank=node_rank, parent_run_id=parent_id)
    if parent_id and uri:
        tracking.client(uri).set_terminated(parent_id, status.FAILED)
    status.refuse(error)


def refuse(cfg: DictConfig, error: ConfigError, run_dir: Path, parent_id: str | None, hc: DictConfig) -> Objective:
    """A refused config: a trial of a search fails and the search goes on; anything else exits 2."""
    node = cfg.trainer.node_rank
    if searching(hc) and node == 0:
        tags = _tags(cfg, dict(hc.runtime.choices), cfg.trainer.nnodes * cfg.trainer.nproc_per_node)
        return refuse_trial(cfg, error, run_dir, parent_id, tags, hc)
    fail(error, run_dir, node, parent_id, cfg.tracking.uri if parent_id and node == 0 else None)


def _tags(cfg: DictConfig, choices: dict[str, str], world_size: int) -> dict[str, str]:
    tags = {group: str(choices.get(group, cfg[group].get("name", ""))) for group in tracking.CONTRACT_TAGS}
    tags.update(world_size=str(world_size), device=cfg.trainer.device)
    tags[HARDWARE_TAG] = str(cfg.hardware.name)
    if holds_nf4(cfg):  # which library held the frozen base in NF4 (finetune.probe_ms: why, when it was timed)
        tags["nf4_backend"] = str(cfg.finetune.backend)
    tags.update(cpu_info().tags())  # which CPU levers pay depends on these features
    return tags


def default_run_name(tags: dict[str, str], overrides: list[str] = (), varied: list[str] = ()) -> str:
    """``gpt_nano single fp32 x1``, plus the fine-tuning and optimizer options when they are not the defaults
    (full, AdamW) and the compression options when there are any, plus the other
    overrides a sweep varies (``trainer.lr=0.001``), so the jobs of a search are told apart."""
    parts = [tags["model"], tags["parallelism"], tags["precision"], f"x{tags['world_size']}"]
    parts += [tags[g] for g, node in BEFORE_GROUPS.items() if tags.get(g, node["name"]) != node["name"]]
    parts += [tags[g] for g in ("pruning", "quantization") if tags[g] != "none"]
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in varied and key not in ("model", "parallelism", "precision", "finetune", "optimizer", "pruning",
                                         "quantization"):
            parts.append(override.lstrip("+~"))
    return " ".join(parts)


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
        if cfg.plan.get("search"):
            from costlab.launcher.planner import run_search

            run_search(cfg, run_id, run_dir, list(hc.overrides.task))
            outcome = status.FINISHED
            return outcome, run_id
        plan_tags: dict[str, str] = {}
        metrics, lines = make_plan(cfg, plan_tags)
        print_plan(lines)
        client = tracking.client(cfg.tracking.uri)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for key, value in plan_tags.items():
            client.set_tag(run_id, key, value)
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
