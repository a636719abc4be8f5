"""The launcher's side of a run, in ``run.py``'s process: preflight and validation, plan mode, resource
checks, resuming, starting torchrun and waiting, closing the run, the search objective.

No module here imports torch at module level, and none ever initialises CUDA: starting a sweep stays
cheap, and the GPUs belong to the ranks.
"""
