"""Faults met with real processes: kills, signals, a new store under concurrency, unreachable servers.

The fast tests exercise each mechanism of :mod:`costlab.faults` and :mod:`costlab.tracking` on real
processes and a real SQLite store; the slow ones kill real ``run.py`` / torchrun / worker processes and
check that nothing is left running, no run stays RUNNING and nothing logged before the fault is lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from costlab import ROOT, faults, tracking
from costlab.events import FAILURE_TAG
from costlab.schema import ConfigError
from costlab.tracking.runs import OWNER_TAG, check_tracking

from .conftest import TINY, compose_config

PY = sys.executable


def _dead_token() -> str:
    """The token of a process that has exited (and been reaped)."""
    p = subprocess.Popen([PY, "-c", "pass"])
    tok = faults.token(p.pid)
    p.wait()
    return tok


def test_a_token_names_one_live_process_and_not_a_reused_pid():
    p = subprocess.Popen(["sleep", "30"])
    try:
        tok = faults.token(p.pid)
        assert faults.alive(tok)
        assert not faults.alive(f"{p.pid}:1")  # the same pid with another start time: another process
    finally:
        p.kill()
        p.wait()
    assert not faults.alive(tok)
    assert faults.alive(faults.token())


@pytest.mark.parametrize("death", ["die_with_parent", "die_with_launcher"])
def test_a_child_asking_for_its_parents_death_signal_dies_with_its_parent(tmp_path, death):
    """parent -> child (die_with_parent, as the workers ask; die_with_launcher, as torchrun asks); kill -9 the
    parent. torchrun's request is SIGKILL: a child that ignores SIGTERM (as a torchrun stuck in its own SIGTERM
    handling, once seen after a kill -9 of run.py) dies with its parent all the same."""
    ignores = death == "die_with_launcher"
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        sys.path.insert(0, {str(ROOT / 'src')!r})
        from costlab.faults import {death}
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if {ignores} else "")
                                  + "print(flush=True); time.sleep(60)"], preexec_fn={death}, stdout=subprocess.PIPE)
        child.stdout.readline()  # its handler is in place
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    tok = faults.token(child)
    assert faults.alive(tok)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while faults.alive(tok) and time.time() < deadline:
        time.sleep(0.05)
    assert not faults.alive(tok)


STOPPABLE = """
import os, sys, time
sys.path.insert(0, {src!r})
from costlab.faults import StopWatcher, Stopped
stop = StopWatcher(grace_s=1.5).start()
stop.on_timeout.append(lambda: open({flushed!r}, "w").write("flushed"))
try:
    print("ready", flush=True)  # inside the try: the signal may land as soon as the parent reads this line
    if {stuck}:
        r, w = os.pipe()
        os.read(r, 1)  # blocked in a system call that no signal interrupts (they are all blocked here)
    while True:
        time.sleep(0.01)
except Stopped as e:
    print("stopped", e.signum, flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_interrupts_the_main_thread(tmp_path, sig):
    code = STOPPABLE.format(src=str(ROOT / "src"), flushed=str(tmp_path / "f"), stuck=False)
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 3 and f"stopped {int(sig)}" in out
    assert not (tmp_path / "f").exists()


def test_a_worker_stuck_where_no_signal_reaches_flushes_and_exits_after_its_grace(tmp_path):
    code = STOPPABLE.format(src=str(ROOT / "src"), flushed=str(tmp_path / "f"), stuck=True)
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=10)
    assert p.returncode == 128 + signal.SIGTERM
    assert 1.0 < time.time() - t0 < 6
    assert (tmp_path / "f").read_text() == "flushed"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop is the point
def test_a_launcher_signal_whose_exception_python_drops_is_not_lost():
    # Python drops an exception raised in a __del__ or an at-fork hook (logging's, inside Popen): a Ctrl-C
    # landing there while torchrun was forked used to be lost, and the job trained on
    previous = faults.handle_stop_signals()
    try:
        faults.check_interrupted()  # nothing pending: no exception
        handler = signal.getsignal(signal.SIGINT)

        class Dropped:
            def __del__(self):
                handler(signal.SIGINT, None)

        Dropped()  # "Exception ignored in ... __del__": the KeyboardInterrupt goes nowhere
        faults.handle_stop_signals()  # launch_torchrun installs the handler again: what it remembers stays
        with pytest.raises(KeyboardInterrupt):
            faults.check_interrupted()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def test_a_shielded_block_holds_the_first_signal_until_it_ends_and_not_a_second():
    previous = faults.handle_stop_signals()
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with faults.shielded():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now: it held the signal
                done.append(1)
        assert done == [1]
        with pytest.raises(KeyboardInterrupt):  # a second signal in the block is raised at once
            with faults.shielded():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append(2)
        assert done == [1]
        with faults.shielded():  # nothing pending from before: the block ends quietly
            done.append(3)
        assert done == [1, 3]
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def test_a_signal_during_a_store_write_lets_the_write_finish_and_the_store_stay_writable(tmp_path):
    # A KeyboardInterrupt inside SQLAlchemy's commit could leave this process's connection in an open write
    # transaction: SQLite stayed locked and closing the runs KILLED on the way out failed (a sweep's parent
    # stayed RUNNING). The signal is sent from inside the commit itself.
    from sqlalchemy import event

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    c = tracking.client(uri)
    run_id = c.create_run(c.create_experiment("shield")).info.run_id
    engine = c._inner._tracking_client.store.engine

    def signal_in_commit(conn):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, in the middle of the commit

    previous = faults.handle_stop_signals()
    event.listen(engine, "commit", signal_in_commit)
    try:
        with pytest.raises(KeyboardInterrupt):
            c.set_tag(run_id, "written", "yes")
    finally:
        event.remove(engine, "commit", signal_in_commit)
        for sig, h in previous.items():
            signal.signal(sig, h)
    t0 = time.monotonic()
    c.set_terminated(run_id, "KILLED")
    assert time.monotonic() - t0 < 2  # no lock left behind to wait out
    run = c.get_run(run_id)
    assert run.data.tags["written"] == "yes" and run.info.status == "KILLED"


@pytest.mark.parametrize("code, rc", [(0, 0), (3, 3), (None, 0), ("costlab: bye", 1)])
def test_exit_now_runs_atexit_flushes_and_keeps_the_exit_code(code, rc):
    script = textwrap.dedent(f"""
        import atexit, sys
        from costlab.faults import exit_now
        atexit.register(lambda: print("atexit ran", file=sys.stderr))
        sys.stdout.write("unflushed")
        exit_now({code!r})
        print("never")
    """)
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc
    assert proc.stdout == "unflushed"
    assert "atexit ran" in proc.stderr
    assert ("costlab: bye" in proc.stderr) == isinstance(code, str)


def test_ranks_wait_for_the_run_id_run_py_records_once_the_run_is_open(tmp_path):
    from omegaconf import OmegaConf

    from costlab import status
    from costlab.training.checkpoint import job_run_id

    status.write(tmp_path, status.RUNNING, node_rank=0)  # run.py, before torchrun starts: no run yet
    assert status.run_id_of(tmp_path) is None
    threading.Timer(0.5, lambda: status.write(tmp_path, status.RUNNING, node_rank=0, run_id="abc")).start()
    cfg = OmegaConf.create({"runtime": {"run_id": None, "run_dir": str(tmp_path)}, "trainer": {"node_rank": 0}})
    t0 = time.monotonic()
    assert job_run_id(cfg) == "abc"
    assert time.monotonic() - t0 >= 0.4
    cfg.runtime.run_id = "resumed"  # a resumed run's id is in its config
    assert job_run_id(cfg) == "resumed"
    cfg.runtime.run_id, cfg.trainer.node_rank = None, 1  # another node opens no run
    assert job_run_id(cfg) is None


def test_reaping_kills_recorded_workers_that_outlive_torchrun(tmp_path):
    ignoring = subprocess.Popen([PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "time.sleep(60)"])
    try:
        path = faults.worker_pid_file(tmp_path, 0, 1)
        path.parent.mkdir(parents=True)
        path.write_text(faults.token(ignoring.pid))
        (tmp_path / "pids" / "node0.rank0").write_text(_dead_token())
        assert faults.live_workers(tmp_path, 0) == [faults.token(ignoring.pid)]
        assert faults.reap_workers(tmp_path, 0, wait_s=0.5) == 1
        ignoring.wait(timeout=5)
        assert faults.live_workers(tmp_path, 0) == []
    finally:
        ignoring.kill()


def test_runs_whose_owner_died_are_closed_failed_at_the_next_start(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config([f"tracking.uri={uri}", "tracking.experiment_name=orphans"])
    check_tracking(cfg)
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("orphans").experiment_id
    host = faults.owner().split(":")[0]
    dead = c.create_run(exp, tags={OWNER_TAG: f"{host}:{_dead_token()}"}).info.run_id
    live = c.create_run(exp, tags={OWNER_TAG: faults.owner()}).info.run_id
    elsewhere = c.create_run(exp, tags={OWNER_TAG: "another-host:1:1"}).info.run_id
    check_tracking(cfg)  # what every run.py start does
    assert c.get_run(dead).info.status == "FAILED"
    assert c.get_run(dead).data.tags[FAILURE_TAG] == "launcher_died"
    assert c.get_run(live).info.status == "RUNNING"
    assert c.get_run(elsewhere).info.status == "RUNNING"  # another host's processes are not ours to judge


def test_a_run_its_owner_closed_just_before_exiting_is_not_closed_failed(tmp_path, monkeypatch):
    """The race of concurrent starts on one store: a start finds a run RUNNING, and before it asks whether the
    owner still runs, the owner closes the run FINISHED and exits. The run stays FINISHED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config([f"tracking.uri={uri}", "tracking.experiment_name=orphans"])
    check_tracking(cfg)
    c = tracking.client(uri)
    owner = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    tag = f"{faults.owner().split(':')[0]}:{faults.token(owner.pid)}"
    run = c.create_run(c.get_experiment_by_name("orphans").experiment_id, tags={OWNER_TAG: tag}).info.run_id
    real = faults.owner_alive

    def owner_finishes_first(owner_tag):  # between the search and the check: the owner closes its run and exits
        if owner_tag == tag and owner.poll() is None:
            c.set_terminated(run, "FINISHED")
            owner.kill()
            owner.wait(timeout=10)
        return real(owner_tag)

    monkeypatch.setattr(faults, "owner_alive", owner_finishes_first)
    try:
        check_tracking(cfg)
    finally:
        owner.kill()
        owner.wait(timeout=10)
    assert owner.returncode is not None and faults.alive(faults.token(owner.pid)) is False
    assert c.get_run(run).info.status == "FINISHED"
    assert FAILURE_TAG not in c.get_run(run).data.tags


def test_runs_this_process_opened_are_closed_on_the_way_out(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    c = tracking.client(uri)
    exp = tracking.experiment_id(uri, "abandoned")
    open_id = tracking.create_run(c, uri, exp, "left open", {})
    done_id = tracking.create_run(c, uri, exp, "closed", {})
    c.set_terminated(done_id, "FINISHED")
    assert tracking.close_abandoned(uri, "KILLED") == [open_id]
    assert c.get_run(open_id).info.status == "KILLED"
    assert c.get_run(done_id).info.status == "FINISHED"
    assert c.get_run(open_id).data.tags[OWNER_TAG] == faults.owner()


def test_an_unreachable_tracking_server_is_refused_within_seconds():
    cfg = compose_config(["tracking.uri=http://127.0.0.1:9"])
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        check_tracking(cfg)
    assert time.time() - t0 < 5
    assert e.value.key == "tracking.uri" and "127.0.0.1:9" in str(e.value)


def test_an_empty_experiment_name_is_blamed_on_itself(tmp_path):
    cfg = compose_config([f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "tracking.experiment_name=''"])
    with pytest.raises(ConfigError) as e:
        check_tracking(cfg)
    assert e.value.key == "tracking.experiment_name"
    assert not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_a_locked_database_is_waited_out(tmp_path):
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    exp = tracking.experiment_id(uri, "locked")
    holder = sqlite3.connect(tmp_path / "mlflow.db", timeout=0, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    threading.Timer(6.0, holder.rollback).start()  # longer than SQLAlchemy's own 5 s busy wait
    c = tracking.client(uri)
    t0 = time.time()
    run_id = tracking.create_run(c, uri, exp, "patient", {})
    assert time.time() - t0 > 5.5
    assert c.get_run(run_id).info.status == "RUNNING"
    c.set_terminated(run_id, "FINISHED")
    holder.close()


# --- real run.py processes, killed ------------------------------------------------------------------------


class Job:
    """``python run.py`` as a user starts it (SIGINT at its default), its console read line by line with
    the time each line arrived."""

    def __init__(self, cli, *overrides: str, run_dir: str = "run"):
        self.cli, self.run_dir = cli, cli.out / run_dir
        args = [PY, str(ROOT / "run.py"), *overrides, f"tracking.uri={cli.uri}", f"hydra.run.dir={self.run_dir}",
                f"hydra.sweep.dir={cli.out}/multirun"]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, needle: str, timeout: float = 120) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for t, line in list(self.lines):
                if needle in line:
                    return t
            if self.proc.poll() is not None:
                time.sleep(0.5)
                break
            time.sleep(0.05)
        raise AssertionError(f"never printed {needle!r}:\n{self.text()[-3000:]}")

    def step_printed_before(self, moment: float) -> int:
        """The last training step the console showed at least 2 s before ``moment``."""
        steps = [int(line.split()[1].split("/")[0]) for t, line in self.lines
                 if line.startswith("step ") and "loss" in line and "val/" not in line and t <= moment - 2]
        return max(steps, default=0)

    def workers(self) -> list[str]:
        return faults.live_workers(self.run_dir, 0)

    def strays(self) -> list[str]:
        """Every process still running this job's torchrun or workers, recorded or not."""
        out = subprocess.run(["pgrep", "-af", f"costlab.training {self.run_dir}/config.yaml"], capture_output=True,
                             text=True).stdout
        return [line for line in out.splitlines() if "pgrep" not in line]

    def torchrun_pid(self) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "torch.distributed.run"], capture_output=True,
                             text=True).stdout.split()
        assert out, "torchrun is not running"
        return int(out[0])

    def run_id(self) -> str:
        import re

        found = re.search(r"run ([0-9a-f]{32}) ", self.text())
        assert found, self.text()[-2000:]
        return found.group(1)

    def gone(self, tokens: list[str], timeout: float = 30) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not any(faults.alive(t) for t in tokens):
                return True
            time.sleep(0.2)
        return False

    def finish(self, timeout: float = 120) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(timeout=60)
        self._reader.join(timeout=5)
        return self.proc.returncode


LONG = [*TINY, "parallelism=ddp", "trainer.max_steps=100000", "trainer.print_every=1"]


def _logged_steps(cli, run_id: str) -> list[int]:
    return sorted(m.step for m in cli.client().get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("victim", ["run.py", "torchrun", "rank 0", "rank 1"])
def test_kill_9_leaves_nothing_running_and_loses_nothing_logged_before(cli, victim):
    job = Job(cli, *LONG, f"tracking.run_name=kill9 {victim}")
    job.wait_for("step 20/")
    workers = job.workers()
    assert len(workers) == 2
    everything = [faults.token(job.proc.pid), faults.token(job.torchrun_pid()), *workers]
    target = {"run.py": everything[0], "torchrun": everything[1], "rank 0": workers[0], "rank 1": workers[1]}[victim]
    moment = time.time()
    os.kill(int(target.split(":")[0]), signal.SIGKILL)
    assert job.gone(everything, timeout=30), f"left running after 30 s: {[t for t in everything if faults.alive(t)]}"
    assert job.strays() == []
    if victim != "run.py":
        assert job.finish(timeout=10) == 1
    run_id = job.run_id()
    time.sleep(0.5)
    run = cli.client().get_run(run_id)
    assert run.info.status == "FAILED"
    if victim == "run.py":  # its rank 0 closed the run, knowing why
        assert run.data.tags[FAILURE_TAG] == "launcher_died"
    steps = _logged_steps(cli, run_id)
    assert steps == list(range(len(steps)))  # no step lost in the middle
    # console lines say "step N" for step index N-1
    assert (steps[-1] if steps else -1) >= job.step_printed_before(moment) - 1


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("when", ["starting", "training"])
def test_a_signal_ends_a_run_killed_in_bounded_time(cli, sig, when):
    job = Job(cli, *LONG, f"tracking.run_name=signal {sig.name} {when}")
    if when == "starting":
        job.wait_for("starting 2 rank(s)")
    else:
        job.wait_for("step 10/")
    moment = time.time()
    job.proc.send_signal(sig)
    assert job.finish(timeout=30) == 130
    assert time.time() - moment < 25
    run = cli.client().get_run(job.run_id())
    assert run.info.status == "KILLED"
    time.sleep(1)
    assert job.workers() == [] and job.strays() == []
    steps = _logged_steps(cli, job.run_id())
    if when == "training":
        assert steps == list(range(len(steps))) and steps[-1] >= job.step_printed_before(moment) - 1


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("sig, when", [(signal.SIGTERM, "between jobs"), (signal.SIGINT, "in a job")])
def test_a_signal_in_a_sweep_closes_the_sweep(cli, sig, when):
    experiment = f"sweepstop {sig.name}"
    steps = "trainer.max_steps=2" if when == "between jobs" else "trainer.max_steps=100000"
    job = Job(cli, "-m", *TINY, steps, "trainer.print_every=1", "trainer.seed=1,2,3",
              f"tracking.experiment_name={experiment}")
    # between jobs: the first is done, the second is being set up; in a job: the first is training
    job.wait_for(" FINISHED in " if when == "between jobs" else "step 5/")
    job.proc.send_signal(sig)
    assert job.finish(timeout=90) == 130, job.text()[-3000:]
    runs = cli.runs(experiment)
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    parent = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == tracking.SWEEP_ROLE]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    out = subprocess.run(["pgrep", "-af", f"costlab.training {cli.out}/multirun"], capture_output=True,
                         text=True).stdout
    assert [line for line in out.splitlines() if "pgrep" not in line] == []


@pytest.mark.slow
@pytest.mark.e2e
def test_interrupting_the_first_use_of_a_new_store_never_breaks_it(cli, tmp_path):
    for i, delay in enumerate((0.5, 1.5, 2.5, 3.5)):
        store = f"sqlite:///{tmp_path / f'store{i}' / 'mlflow.db'}"
        p = subprocess.Popen([PY, str(ROOT / "run.py"), *TINY, f"tracking.uri={store}",
                              f"hydra.run.dir={tmp_path}/run{i}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        cli.uri = store
        # the next start opens the store and a run in it, and closes what the interrupted one left open: a plan's
        # (on a card, so that it probes nothing here) does all a training run's launcher does with the store
        proc = cli(*TINY, "mode=plan", "hardware=h100_sxm", "tracking.run_name=after")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert tracking.client(store).search_runs([tracking.experiment_id(store, "costlab")],
                                                  "tags.mlflow.runName = 'after'")[0].info.status == "FINISHED"
        runs = tracking.client(store).search_runs([tracking.experiment_id(store, "costlab")])
        assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.slow
@pytest.mark.e2e
def test_concurrent_first_runs_and_a_sweep_on_a_new_store_all_succeed(cli, tmp_path):
    store = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    base = [PY, str(ROOT / "run.py"), *TINY, "trainer.max_steps=2", f"tracking.uri={store}"]
    procs = [subprocess.Popen([*base, f"hydra.run.dir={tmp_path}/run{i}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    sweep = [base[0], base[1], "-m", *base[2:], "trainer.seed=1,2"]
    procs.append(subprocess.Popen([*sweep, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, "\n".join(e[-1500:] for e in errors)
    runs = tracking.client(store).search_runs([tracking.experiment_id(store, "costlab")])
    assert len(runs) == 2 + 3 and all(r.info.status == "FINISHED" for r in runs)


# --- checkpoints and resuming ---------------------------------------------------------------------------------

# long enough that a signal sent on seeing an early step lands well before the last one: on an idle 2-core
# machine it lands ~15 steps (~0.3 s) after the step the test saw, and a signal during the last step stops the
# run without a checkpoint, as it should (with 40 steps a loaded machine got there)
RESUMABLE = [*TINY, "trainer.max_steps=150", "trainer.checkpoint_interval=5", "trainer.print_every=1",
             "trainer.warmup_steps=5"]


def _curve(cli, run_id: str) -> list[tuple[int, float]]:
    history = cli.client().get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)


def _same_curve(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]  # every step once: none missing, none twice
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(y), f"step {step}: {x} vs {y}"


@pytest.fixture(scope="module")
def reference(mlflow_uri, tmp_path_factory):
    """The uninterrupted fp32 loss curves, one per parallelism."""
    from .conftest import Cli

    cli = Cli(mlflow_uri, tmp_path_factory.mktemp("reference"))
    curves = {}
    for parallelism in ("ddp", "fsdp", "hsdp"):
        name = f"uninterrupted {parallelism}"
        proc = cli(*RESUMABLE, f"parallelism={parallelism}", f"tracking.run_name={name}",
                   f"hydra.run.dir={cli.out / parallelism}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        curves[parallelism] = _curve(cli, cli.run_by_name(name).info.run_id)
    return curves


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("parallelism, saving", [("ddp", "sync"), ("fsdp", "sync"), ("fsdp", "async")])
def test_a_dead_rank_is_restarted_and_the_run_resumes_its_curve(cli, reference, parallelism, saving):
    job = Job(cli, *RESUMABLE, f"parallelism={parallelism}", "trainer.max_restarts=1",
              f"trainer.checkpoint_async={saving == 'async'}", f"tracking.run_name=restarted {parallelism} {saving}")
    job.wait_for("step 13/")  # a checkpoint of step 10 exists, and steps after it were logged
    os.kill(int(job.workers()[1].split(":")[0]), signal.SIGKILL)
    assert job.finish(timeout=300) == 0, job.text()[-3000:]
    assert "resumed from step_" in job.text()
    run = cli.run_by_name(f"restarted {parallelism} {saving}")
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["fault/restarts"] == 1 and m["fault/resumes"] == 1 and m["fault/lost_s"] > 0
    assert m["checkpoint/bytes"] > 0 and m["checkpoint/save_s"] > 0
    _same_curve(_curve(cli, run.info.run_id), reference[parallelism])


@pytest.mark.slow
@pytest.mark.e2e
# hsdp: 4 ranks, shards on a 2-D mesh (ddp's and fsdp's checkpoints are resumed by the restarts above; the
# preemption itself, a SIGTERM checkpointed at the next step and trainer.resume, is the same for every layout)
@pytest.mark.parametrize("parallelism", ["hsdp"])
def test_a_preempted_run_checkpoints_and_resume_continues_it(cli, reference, parallelism):
    name = f"preempted {parallelism}"
    job = Job(cli, *RESUMABLE, f"parallelism={parallelism}", f"tracking.run_name={name}")
    job.wait_for("step 7/")
    job.proc.send_signal(signal.SIGTERM)  # preemption: checkpoint at the next step boundary, then stop
    assert job.finish(timeout=60) == 130
    assert "checkpoint saved for trainer.resume" in job.text(), job.text()[-3000:]
    run = cli.run_by_name(name)
    assert run.info.status == "KILLED"
    proc = cli(f"trainer.resume={run.info.run_id}", "hydra.run.dir=" + str(cli.out / "resumed"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cli.client().get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["fault/resumes"] == 1 and run.data.metrics["fault/restarts"] == 0
    _same_curve(_curve(cli, run.info.run_id), reference[parallelism])
    again = cli(f"trainer.resume={run.info.run_id}")
    assert again.returncode == 2 and "FINISHED" in again.stderr


def test_resume_refuses_what_it_cannot_continue(cli):
    bad = cli("trainer.resume=0123456789abcdef0123456789abcdef")
    assert bad.returncode == 2 and "trainer.resume=" in bad.stderr and "Traceback" not in bad.stderr
    other = cli("trainer.resume=0123456789abcdef0123456789abcdef", "trainer.lr=0.1")
    assert other.returncode == 2 and "drop trainer.lr=0.1" in other.stderr
    gradual = cli("pruning=l1_unstructured", "pruning.schedule=gradual", "trainer.checkpoint_interval=5")
    assert gradual.returncode == 2 and "trainer.checkpoint_interval=5" in gradual.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_resume_refuses_a_run_without_checkpoints(cli):
    proc = cli(*TINY, "trainer.max_steps=2", "tracking.run_name=no checkpoints")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = cli.run_by_name("no checkpoints")
    cli.client().set_terminated(run.info.run_id, "KILLED")
    no_ckpt = cli(f"trainer.resume={run.info.run_id}")
    assert no_ckpt.returncode == 2 and "holds no checkpoint" in no_ckpt.stderr


def test_jobs_logging_one_corpus_at_once_all_get_its_dataset(tmp_path):
    """The jobs of a sweep log the same corpus as their dataset input at the same moment. MLflow looks for the
    experiment's dataset and then inserts it, so a job can collide with another's insert (SQLite's UNIQUE
    constraint on the datasets table); each job's run still gets the one dataset. Real threads on a real store,
    released together by a barrier, many rounds: without the retry a few of them collide."""
    from costlab.tracking.runs import log_corpus
    from costlab.tracking.store import client, experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = compose_config([]).data
    jobs, rounds = 6, 20
    for n in range(rounds):
        experiment = experiment_id(uri, f"round{n}")
        clients = [client(uri) for _ in range(jobs)]
        runs = [c.create_run(experiment).info.run_id for c in clients]
        start, errors = threading.Barrier(jobs), []

        def job(c, run_id, start=start, errors=errors):
            start.wait()
            try:
                log_corpus(c, run_id, data)
            except Exception as e:  # collected: the assertion names it
                errors.append(e)

        threads = [threading.Thread(target=job, args=pair) for pair in zip(clients, runs, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        digests = {i.dataset.digest for r in runs for i in clients[0].get_run(r).inputs.dataset_inputs}
        assert len(digests) == 1 and all(clients[0].get_run(r).inputs.dataset_inputs for r in runs)
