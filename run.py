"""costlab's one entry point: compose the config groups with Hydra, then launch the job with torchrun.

    python run.py                                        # the default experiment
    python run.py parallelism=ddp precision=fp16         # 2 ranks
    python run.py -m parallelism=single,ddp precision=fp32,bf16
    python run.py +experiment=precision_study
    python run.py -m hydra/sweeper=optuna hydra.sweeper.n_trials=10 'trainer.lr=interval(1e-4,1e-2)'

Exit codes: 0 when the job (every job of a sweep) finished, 1 when one failed, 2 when a config was
refused, 130 on Ctrl-C. A job's or sweep's code is set by ``costlab.tracking.SweepParentRun`` from
the jobs' own records, so it is right whichever Hydra launcher ran them.
"""

import signal
import sys

import hydra
from omegaconf import DictConfig

from costlab import faults, launch, tracking
from costlab.cli import preflight
from costlab.status import EXIT_INTERRUPTED, FAILED, KILLED


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """One job; returns its ``optimized_metric`` (default eval/loss), so search sweepers such as Optuna work."""
    return launch.run_job(cfg)


if __name__ == "__main__":
    faults.handle_stop_signals()  # SIGTERM (a scheduler, `kill`) ends run.py as Ctrl-C does: nothing left RUNNING
    preflight()
    try:
        main()
        code = 0
    except SystemExit as e:  # Hydra's way out, and the verdict of a job or sweep (costlab.tracking)
        tracking.close_abandoned(FAILED)  # nothing this process opened stays RUNNING
        code = e.code
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while closing ends run.py outright
        tracking.close_abandoned(KILLED)  # e.g. a sweep's parent, interrupted between two jobs
        print("costlab: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BaseException:
        tracking.close_abandoned(FAILED)
        raise
    faults.exit_now(code)
