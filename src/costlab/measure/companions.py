"""A CPU plan's companion processes: a plan probes in one process, but a run's ranks share the node's cores and
slow one another's ops, so the plan times its rates while ``trainer.nproc_per_node`` - 1 companions time the same
(:func:`beside_peers`). They start once per process, answer one request a line, and stop at its exit."""

from __future__ import annotations

import functools
from typing import Any

from costlab.measure.stepprobes import with_threads

COMPANION_PROBES = ("matmul_seconds", "fixed_times")  # what a plan's companion times, by name


COMPANION_START_S = 120.0  # a plan's companion process has this long to import torch, and to answer


def companion_command() -> list[str]:
    """The command line of a plan's companion process (:func:`companion`)."""
    import sys

    return [sys.executable, "-c", "from costlab.measure.companions import companion; companion()"]


def beside_peers(peers: int, threads: int, probe: str, *args: Any) -> tuple[list[float], int]:
    """(``probe`` (one of :data:`COMPANION_PROBES`) of ``args`` with ``threads`` threads, timed in this process
    while ``peers`` companion processes (:func:`companions`) time the same at once, as a run's ranks do on the
    cores they share, each figure the slowest process's; how many companions timed). A plan has no peers of its
    own, and they slow one another: two processes dispatching ops at once on the 2-core EPYC read 3.6-6.9 us per
    op, alone 3.5-3.6. Where a companion cannot start or answer, this process's figures alone (a warning on
    stderr says why)."""
    import json
    import sys

    def mine() -> list[float]:
        return with_threads(threads, lambda: _companion_probe(probe)(*args))

    if peers <= 0:
        return mine(), 0
    try:
        rows = at_once(companions(threads, peers), json.dumps([threads, probe, *args]), mine)
        if not all(isinstance(row, list) and len(row) == len(rows[0]) for row in rows):
            raise RuntimeError(f"a companion process answered {rows[1:]}")
        return [max(column) for column in zip(*rows, strict=True)], peers
    except (OSError, RuntimeError, ValueError) as e:
        companions.cache_clear()  # the next plan starts new ones (these stop at exit)
        print(f"costlab: warning: the plan's rates timed without companions ({e})", file=sys.stderr, flush=True)
        return mine(), 0


@functools.lru_cache(maxsize=4)
def companions(threads: int, peers: int) -> tuple[Any, ...]:
    """``peers`` companion processes (:func:`companion`, ``threads`` threads each), started once per process (a
    search plans many candidates) and stopped at its exit; each has imported torch and waits for a request."""
    import atexit

    procs = start_companions(companion_command(), peers, {"OMP_NUM_THREADS": str(threads)})
    atexit.register(stop_companions, procs)
    return procs


def start_companions(command: list[str], peers: int, env: dict[str, str] | None = None) -> tuple[Any, ...]:
    """``peers`` processes of ``command`` (``env`` added to this process's, the folder that holds costlab on their
    path), each having written ``ready``; RuntimeError (none left running) where one exits first or is silent for
    :data:`COMPANION_START_S`."""
    import os
    import subprocess
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2])
    full = {**os.environ, **(env or {}),
            "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    procs: list[Any] = []
    try:
        for _ in range(peers):
            procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full))
        for proc in procs:
            if _answer(proc) != "ready":
                raise RuntimeError(f"a companion process exited with code {proc.wait()} before timing")
    except BaseException:
        stop_companions(tuple(procs))
        raise
    return tuple(procs)


def stop_companions(procs: tuple[Any, ...]) -> None:
    """Closes each companion's input (it exits), and kills one that has not within a few seconds."""
    import subprocess

    for proc in procs:
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()


def at_once(procs: tuple[Any, ...], request: str, mine: Any) -> list[Any]:
    """[``mine()``, then each companion's answer to ``request``]: writes the request (one line) to each and runs
    ``mine`` here while they work, then reads each one's answer, a JSON line. RuntimeError where one closed its
    output or is silent for :data:`COMPANION_START_S`."""
    import json

    for proc in procs:
        proc.stdin.write(request + "\n")
        proc.stdin.flush()
    rows = [mine()]
    return rows + [json.loads(_answer(proc) or "null") for proc in procs]


def _answer(proc: Any) -> str:
    """The next line ``proc`` writes, stripped ("" once it closed its output); RuntimeError after
    :data:`COMPANION_START_S` of silence."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(COMPANION_START_S):
            raise RuntimeError(f"a companion process was silent for {COMPANION_START_S:.0f} s")
    return proc.stdout.readline().strip()


def _companion_probe(name: str) -> Any:
    """The probe of :data:`COMPANION_PROBES` named ``name`` (looked up when asked for)."""
    from costlab.measure import stepprobes

    if name not in COMPANION_PROBES:
        raise ValueError(f"{name!r} is not one of {COMPANION_PROBES}")
    return getattr(stepprobes, name)


def companion() -> None:
    """A plan's companion process (:func:`beside_peers`): writes ``ready`` once torch is imported, then for each
    request line (a JSON list: threads, one of :data:`COMPANION_PROBES`, its arguments) times it and writes its
    figures as a JSON list, until its input closes."""
    import json
    import sys

    print("ready", flush=True)
    for line in sys.stdin:
        threads, probe, *args = json.loads(line)
        print(json.dumps(with_threads(threads, functools.partial(_companion_probe(probe), *args))), flush=True)
