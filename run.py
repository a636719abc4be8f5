"""costlab's one entry point: compose the config groups with Hydra, then launch the job with torchrun.

    python run.py                                        # the default experiment
    python run.py parallelism=ddp precision=fp16         # 2 ranks
    python run.py -m parallelism=single,ddp precision=fp32,bf16
    python run.py +experiment=precision_study
    python run.py -m hydra/sweeper=optuna hydra.sweeper.n_trials=10 'trainer.lr=interval(1e-4,1e-2)'

Exit codes: 0 when the job (every job of a sweep) finished, 1 when one failed, 2 when a config was
refused, 130 on Ctrl-C. A job's or sweep's code is set by ``costlab.tracking.sweep.SweepParentRun`` from
the jobs' own records, so it is right whichever Hydra launcher ran them.
"""

import signal
import sys

import hydra
from omegaconf import DictConfig

from costlab import faults, quiet_third_party_notes, tracking
from costlab.launcher.job import check_job, run_job
from costlab.launcher.preflight import preflight, tracking_uri
from costlab.status import EXIT_INTERRUPTED, EXIT_REFUSED, FAILED, KILLED


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """One job; returns its ``optimized_metric`` (default eval/loss), so search sweepers such as Optuna work."""
    return run_job(cfg)


def close_abandoned(outcome: str) -> None:
    """Nothing this process opened stays RUNNING: the store knows which runs are this process's. A process
    that never imported MLflow opened none, and spares itself the import."""
    if "mlflow" not in sys.modules:
        return
    uri = tracking_uri(sys.argv[1:])
    try:
        tracking.close_abandoned(uri, outcome)
    except Exception as e:  # on the way out, a store that cannot be read: nothing more can be closed in it
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"costlab: could not close this process's runs in {uri}: {why}", file=sys.stderr)


if __name__ == "__main__":
    quiet_third_party_notes()
    faults.handle_stop_signals()  # SIGTERM (a scheduler, `kill`) ends run.py as Ctrl-C does: nothing left RUNNING
    preflight(check_job=check_job)  # a grid sweep's jobs checked before the first starts
    try:
        try:
            main()
            code = 0
        except SystemExit as e:  # Hydra's way out, and the verdict of a job or sweep (costlab.tracking)
            if e.code == 1 and faults.interrupted():
                # a stop signal that cut through Hydra's composition of the next job, where OmegaConf turned the
                # KeyboardInterrupt into an error of its own and Hydra into exit 1: still an interruption
                raise KeyboardInterrupt from None
            if e.code != EXIT_REFUSED:  # a refused job has closed what it opened, and said why in one line
                close_abandoned(FAILED)
            code = e.code
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while closing ends run.py outright
        close_abandoned(KILLED)  # e.g. a sweep's parent, interrupted between two jobs
        print("costlab: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException:
        close_abandoned(FAILED)
        raise
    faults.exit_now(code)
