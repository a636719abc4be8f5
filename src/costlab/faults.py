"""What ends a run's processes, and how: no worker outlives its launcher, and a stop signal ends a
worker in bounded time with its metrics flushed.

The chain of processes is ``run.py`` → torchrun → one worker per rank. torchrun starts each worker in
a session of its own, so signalling torchrun's process group never reaches them. Instead:

- every worker asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and torchrun for
  SIGKILL (:func:`die_with_launcher`), so a ``kill -9`` of ``run.py`` or of torchrun still stops the workers below
  it;
- each worker records its pid in the run folder, and ``run.py`` ends any worker still alive once
  torchrun has gone (:func:`reap_workers`), whatever ended torchrun;
- in a worker, SIGTERM and SIGINT are taken by one thread (``sigwait``), not by the main thread, which
  may be stuck in a collective whose peer died: that thread interrupts the main thread, and if the
  main thread has not left after a grace period, it flushes what the worker still holds and exits.

Nothing here imports torch: the launcher uses it, and a worker must block the stop signals before
``import torch`` starts threads of its own (a thread that does not block them would receive them).
"""

from __future__ import annotations

import _thread
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import psutil

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
LAUNCHER_ENV = "COSTLAB_LAUNCHER"  # "pid:start" of the run.py that launched torchrun
PID_DIR = "pids"  # in the run folder: one file per worker, "pid start"
WORKER_GRACE_S = 10.0  # a stopped worker's main thread has this long to leave before the process exits
PR_SET_PDEATHSIG = 1


class Stopped(KeyboardInterrupt):
    """Raised in a worker's main thread by SIGTERM or SIGINT (a KeyboardInterrupt, so every cleanup
    written for Ctrl-C runs)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; elsewhere a no-op).
    Safe in a ``preexec_fn``: it only calls ``prctl``."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def die_with_launcher() -> None:
    """torchrun's ``preexec_fn``: SIGKILL when ``run.py`` dies. torchrun holds nothing of the run to flush (its
    workers flush on the SIGTERM their own parent-death request brings them once it has gone, as after a ``kill
    -9`` of torchrun itself), and its own SIGTERM handling is not bounded: after a ``kill -9`` of ``run.py`` it was
    seen still running 30 s after its workers had gone."""
    die_with_parent(signal.SIGKILL)


START_TOLERANCE_S = 1.5  # see alive()


def start_time(pid: int) -> str | None:
    """When the process started, in seconds since the epoch to the clock tick (10 ms): with the pid it names
    a process uniquely, so a reused pid is never mistaken for the one recorded. None if there is none."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def token(pid: int | None = None) -> str:
    """``pid:start`` of this process (or ``pid``)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid) or 0}"


def alive(tok: str) -> bool:
    """Whether the process a :func:`token` names still runs (a zombie counts as gone).

    The start time is the kernel's ticks since boot plus the boot time, which moves when the clock is
    stepped (NTP): a start within :data:`START_TOLERANCE_S` of the recorded one is the same process; a pid
    reused by a process started so close to the first one would have to go round the whole pid range."""
    try:
        pid_s, start = tok.split(":", 1)
        recorded = float(start)
        proc = psutil.Process(int(pid_s))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return recorded == 0 or abs(proc.create_time() - recorded) < START_TOLERANCE_S
    except (ValueError, psutil.NoSuchProcess):  # a zombie psutil cannot read is a NoSuchProcess too
        return False
    except psutil.AccessDenied:  # there, but not ours to inspect: the pid alone answers
        return True


def owner() -> str:
    """``host:pid:start`` of this process: who owns the MLflow runs it opens."""
    return f"{socket.gethostname()}:{token()}"


def owner_alive(owner_tag: str) -> bool | None:
    """Whether the owner an :func:`owner` tag names still runs; None when it ran on another host."""
    host, _, tok = owner_tag.partition(":")
    if host != socket.gethostname():
        return None
    return alive(tok)


# --- the launcher's side ------------------------------------------------------------------------------


class LauncherSignals:
    """The launcher's handler for SIGINT and SIGTERM: both end ``run.py`` as Ctrl-C does.

    Each signal is also remembered (in the handler, which the signal table holds for the process), because
    Python drops the exception when the handler runs inside an at-fork hook (logging's, during
    ``subprocess.Popen``) or a ``__del__``: a Ctrl-C that lands while torchrun is forked would otherwise be
    lost and the job would train on. :func:`check_interrupted` raises it again.

    Inside :func:`shielded` the first signal is held and raised as the block ends; a second one is raised at
    once (the user insists)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.shield_depth = 0
        self.pending = False

    def __call__(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if self.shield_depth and not self.pending:
            self.pending = True
            return
        self.pending = False
        raise KeyboardInterrupt


@contextmanager
def shielded() -> Iterator[None]:
    """Hold a stop signal that lands in the block until the block ends, then raise it (KeyboardInterrupt).

    For calls a KeyboardInterrupt must not cut in half: one raised inside SQLAlchemy's commit or its return of a
    connection to the pool can leave the connection checked out in an open write transaction, and SQLite's lock
    with it, so every later write of this process — closing its runs KILLED on the way out — waits out
    "database is locked" and fails. Only the main thread receives signals; elsewhere, and where the launcher's
    handler is not installed, this does nothing."""
    handler = signal.getsignal(signal.SIGINT)
    if not isinstance(handler, LauncherSignals) or threading.current_thread() is not threading.main_thread():
        yield
        return
    handler.shield_depth += 1
    try:
        yield
    finally:
        handler.shield_depth -= 1
    if handler.shield_depth == 0 and handler.pending:
        handler.pending = False
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether the installed :class:`LauncherSignals` got a stop signal, whatever became of the exception it raised
    (dropped, or turned into another error by code it cut through: OmegaConf wraps what it catches)."""
    handler = signal.getsignal(signal.SIGINT)
    return isinstance(handler, LauncherSignals) and bool(handler.received)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if the installed :class:`LauncherSignals` got a signal, even if the exception
    it raised was dropped."""
    if interrupted():
        raise KeyboardInterrupt


def handle_stop_signals() -> dict[int, object]:
    """Install a :class:`LauncherSignals` for SIGINT and SIGTERM (the one installed already, if any, so
    what it remembers carries over); return the handlers it replaced."""
    current = signal.getsignal(signal.SIGINT)
    handler = current if isinstance(current, LauncherSignals) else LauncherSignals()
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def worker_pid_file(run_dir: Path, node_rank: int, rank: int) -> Path:
    return Path(run_dir) / PID_DIR / f"node{node_rank}.rank{rank}"


def record_worker(run_dir: Path, node_rank: int, rank: int) -> Path:
    """In a worker: write this process's :func:`token` where the launcher finds it."""
    path = worker_pid_file(run_dir, node_rank, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token() + "\n")
    return path


def live_workers(run_dir: Path, node_rank: int) -> list[str]:
    """Tokens of this node's workers of the run that still run."""
    folder = Path(run_dir) / PID_DIR
    files = sorted(folder.glob(f"node{node_rank}.rank*")) if folder.is_dir() else []
    return [t for t in (f.read_text().strip() for f in files) if alive(t)]


def reap_workers(run_dir: Path, node_rank: int, wait_s: float = WORKER_GRACE_S + 2.0) -> int:
    """End this node's workers that outlived torchrun: wait ``wait_s`` for them to leave by themselves
    (each got SIGTERM when torchrun died), then SIGKILL them. Returns how many had to be killed."""
    deadline = time.monotonic() + wait_s
    while live_workers(run_dir, node_rank) and time.monotonic() < deadline:
        time.sleep(0.2)
    return signal_workers(run_dir, node_rank, signal.SIGKILL)


def signal_workers(run_dir: Path, node_rank: int, sig: int) -> int:
    """Send ``sig`` to this node's recorded workers that still run; return how many there were."""
    left = live_workers(run_dir, node_rank)
    for tok in left:
        try:
            os.kill(int(tok.split(":")[0]), sig)
        except ProcessLookupError:
            pass
    return len(left)


# --- the worker's side ----------------------------------------------------------------------------------


def exit_now(code: int | str | None = 0) -> NoReturn:
    """End the process as ``sys.exit(code)`` would, without the interpreter's teardown of every module it
    imported: with torch, MLflow and SQLAlchemy loaded that teardown alone took ~1.5-2 s of every job on a
    2-core CPU, and it does nothing a job needs. Threads are joined and the ``atexit`` handlers run as on
    a normal exit, and output is flushed."""
    import atexit

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    # what the interpreter does first on its way out: join the threads that are not daemons and run the
    # threading atexit hooks (concurrent.futures and joblib's loky shut their executors down there; without
    # them, multiprocessing's atexit hook would wait forever for the executors' worker processes), then the
    # atexit handlers. No public API does either: joining threading.enumerate() by hand would skip the
    # threading hooks, which only threading._shutdown runs; the atexit module can register and unregister
    # handlers but not run them; and sys.exit runs both only on its way into the teardown avoided here.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to say there
            pass
    os._exit(code or 0)


def block_stop_signals() -> None:
    """Block SIGTERM and SIGINT in the calling thread and so in every thread it starts later. Call first
    thing in a worker, before ``import torch``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class StopWatcher:
    """Receives SIGTERM and SIGINT in a thread of its own (see the module's docstring).

    ``defer``: the main thread polls :attr:`requested` and ends itself (a training loop that checkpoints
    on preemption); otherwise the main thread gets :class:`Stopped` at once. Either way, ``grace_s``
    after the signal the process flushes (``on_timeout`` callbacks) and exits with 128 + the signal.
    """

    def __init__(self, grace_s: float = WORKER_GRACE_S):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.defer = False
        self.on_timeout: list[Callable[[], None]] = []
        self._event = threading.Event()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def start(self) -> StopWatcher:
        block_stop_signals()
        for sig in STOP_SIGNALS:  # what interrupt_main runs in the main thread
            signal.signal(sig, _raise_stopped)
        threading.Thread(target=self._watch, name="costlab-stop", daemon=True).start()
        return self

    def _watch(self) -> None:
        signum = signal.sigwait(STOP_SIGNALS)
        self.signum = signum
        self._event.set()
        print(f"costlab: worker {os.getpid()} got {signal.Signals(signum).name}; stopping", file=sys.stderr,
              flush=True)
        if not self.defer:
            _thread.interrupt_main(signum)
        time.sleep(self.grace_s)
        for callback in self.on_timeout:
            try:
                callback()
            except Exception:  # the process ends anyway; what could be flushed was
                pass
        print(f"costlab: worker {os.getpid()} did not stop within {self.grace_s:.0f}s; exiting", file=sys.stderr,
              flush=True)
        os._exit(128 + signum)


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)
