"""Starting torchrun for a job, teeing its output, and making sure no worker outlives it; SLURM's node list."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig

from costlab import faults
from costlab.schema import ConfigError

TERM_GRACE_S = 15.0


SLURM_PORT_BASE = 20000  # rendezvous port = base + job id mod 20000: concurrent jobs do not collide


def from_slurm(cfg: DictConfig) -> None:
    """Inside a SLURM allocation of several nodes, one run.py per node (Hydra's submitit launcher
    with ``tasks_per_node=1``): take this node's rank and node 0's host from the allocation, as
    submitit's :class:`~submitit.slurm.slurm.SlurmJobEnvironment` reads them from SLURM's variables
    (the node list is expanded in Python: no ``scontrol`` needed).

    ``trainer.nnodes`` must still be given (it matches ``hydra.launcher.nodes``); an explicit
    ``trainer.rdzv_endpoint`` wins over the derived one.
    """
    t = cfg.trainer
    # a SLURM task (sbatch, srun, or submitit's own): submitit's activated() would also want SUBMITIT_EXECUTOR
    if t.nnodes <= 1 or "SLURM_JOB_ID" not in os.environ or "SLURM_NODEID" not in os.environ:
        return
    try:
        from submitit.slurm.slurm import SlurmJobEnvironment, SlurmParseException
    except ImportError:
        raise ConfigError("trainer.nnodes", t.nnodes, "a job on several SLURM nodes reads its allocation through "
                          "submitit: pip install 'costlab[slurm]'") from None
    slurm = SlurmJobEnvironment()
    if slurm.num_nodes != t.nnodes:
        raise ConfigError("trainer.nnodes", t.nnodes, f"the SLURM allocation has {slurm.num_nodes} nodes")
    t.node_rank = slurm.node
    # SLURM_JOB_ID: each task of an array has its own (submitit's job_id, "<array>_<task>", shares its number)
    job = slurm.raw_job_id
    if not t.rdzv_endpoint:
        try:
            host = slurm.hostnames[0]
        except SlurmParseException:
            raise ConfigError("trainer.rdzv_endpoint", None, f"SLURM_JOB_NODELIST={os.environ['SLURM_JOB_NODELIST']}"
                              " cannot be read; set trainer.rdzv_endpoint=<node 0's host>:<port>") from None
        t.rdzv_endpoint = f"{host}:{SLURM_PORT_BASE + int(job.split('_')[0]) % 20000}"
    t.rdzv_id = f"costlab-{job}"


def torchrun_command(cfg: DictConfig, config_path: Path) -> list[str]:
    t = cfg.trainer
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.nproc_per_node}"]
    if t.get("max_restarts"):
        cmd.append(f"--max-restarts={t.max_restarts}")  # each restart resumes from the latest checkpoint
    if t.nnodes == 1:
        cmd.append("--standalone")  # c10d rendezvous on a free port: concurrent jobs never collide
    else:
        cmd += [
            f"--nnodes={t.nnodes}",
            f"--node-rank={t.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={t.rdzv_endpoint}",
            f"--rdzv-id={t.rdzv_id}",
        ]
    return cmd + ["-m", "costlab.training", str(config_path)]


def worker_env(cfg: DictConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if cfg.trainer.nnodes == 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: loopback is always right
    # each local rank gets an equal share of the cores, so world sizes compare on the same hardware
    threads = max(1, (os.cpu_count() or 1) // cfg.trainer.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def job_prefix(hc: DictConfig) -> bytes:
    """Under a launcher that runs jobs side by side, each console line of a job names it."""
    if hc.mode != RunMode.MULTIRUN or hc.launcher.get("_target_") == BASIC_LAUNCHER:
        return b""
    return f"[job {hc.job.num}] ".encode()


def launch_torchrun(cfg: DictConfig, config_path: Path, log_path: Path, prefix: bytes = b"",
                    while_starting: Callable[[], None] | None = None) -> int:
    """Run torchrun in its own process group, tee its output to ``log_path`` (and to the console, each line
    after ``prefix``); return its exit code. ``while_starting`` runs once torchrun has started: if it raises,
    torchrun and its workers are stopped as on Ctrl-C and the exception is raised here.

    No worker outlives this call (see :mod:`costlab.faults`): on Ctrl-C (or SIGTERM to this process)
    torchrun's group and each worker get SIGTERM, then SIGKILL after a grace period; however torchrun
    ended, workers still alive are ended before this returns; and if this process is killed outright,
    torchrun gets SIGTERM from the kernel and stops its workers.
    """
    run_dir, node = Path(cfg.runtime.run_dir), int(cfg.trainer.node_rank)
    offset = log_path.stat().st_size if log_path.exists() else 0  # a resumed run appends to its log
    proc = _start(cfg, config_path, log_path)
    tee = LogTee(proc, log_path, offset, prefix)
    tee.start()
    previous = faults.handle_stop_signals()
    try:
        if while_starting is not None:
            while_starting()
        return _wait(proc)
    except BaseException:  # Ctrl-C, SIGTERM, or while_starting failed: no worker runs on
        faults.signal_workers(run_dir, node, signal.SIGTERM)
        _terminate_group(proc)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        killed = faults.reap_workers(run_dir, node)
        if killed:
            print(f"costlab: {killed} worker(s) outlived torchrun and were killed", file=sys.stderr, flush=True)
        tee.join(timeout=10)


def _start(cfg: DictConfig, config_path: Path, log_path: Path) -> subprocess.Popen:
    env = worker_env(cfg)
    env[faults.LAUNCHER_ENV] = faults.token()
    # torchrun writes into the log file itself, not into a pipe to this process: if this process dies,
    # the workers' output (and their last words about it) still has somewhere to go
    with log_path.open("ab") as log:
        return subprocess.Popen(
            torchrun_command(cfg, config_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=faults.die_with_launcher,
        )


def _wait(proc: subprocess.Popen) -> int:
    while True:  # short waits: the main thread returns to Python often enough to act on a signal
        faults.check_interrupted()  # a signal whose exception Python dropped (e.g. during the fork)
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue


class LogTee(threading.Thread):
    """Copies what torchrun appends to its log (from ``offset`` on) to this process's stdout, whole lines each
    after ``prefix``, until torchrun has exited and the log is read to its end."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, offset: int, prefix: bytes) -> None:
        super().__init__(name="costlab-tee", daemon=True)
        self.proc, self.log_path, self.offset, self.prefix = proc, log_path, offset, prefix

    def run(self) -> None:
        # signals go to the main thread: one delivered here would leave the main thread waiting on torchrun
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        with self.log_path.open("rb") as f:
            f.seek(self.offset)
            pending = b""
            while True:
                done = self.proc.poll() is not None  # read once more after torchrun exits: nothing is missed
                chunk = f.read()
                *lines, pending = (pending + chunk).split(b"\n")
                self._write(lines)
                if done and not chunk:
                    break
                if not chunk:
                    time.sleep(0.1)
        if pending:
            self._write([pending])

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        for line in lines:
            sys.stdout.buffer.write(self.prefix + line + b"\n")
        sys.stdout.flush()


def _terminate_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            # torchrun has exited; make sure no worker of its group lingers
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return
