"""The rank's side of a run: its entry point (``python -m costlab.training``, started by torchrun), the
trainer, the loss, the data and tokenizers, and training checkpoints.

Nothing here imports MLflow: rank 0 appends its metrics and tags to the run folder
(:mod:`costlab.events`) and ``run.py`` relays them into the run. This file imports nothing, so that the
entry point can block the stop signals before torch starts threads (see :mod:`costlab.faults`).
"""
