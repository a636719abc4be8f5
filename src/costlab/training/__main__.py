"""``python -m costlab.training RUN_DIR/config.yaml``: one rank of a run, as torchrun starts it."""

from costlab.training.worker import main

main()
