"""costlab's one entry point: compose the config groups with Hydra, then launch the job with torchrun.

    python run.py                                        # the default experiment
    python run.py parallelism=ddp precision=fp16         # 2 ranks
    python run.py -m parallelism=single,ddp precision=fp32,bf16
    python run.py +experiment=precision_study
"""

import sys

import hydra
from omegaconf import DictConfig

from costlab import launch
from costlab.cli import preflight


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    return launch.run_job(cfg)


if __name__ == "__main__":
    preflight()
    try:
        main()
    except KeyboardInterrupt:
        print("costlab: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(launch.exit_code())
