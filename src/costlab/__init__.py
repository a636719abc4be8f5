"""costlab: measure what each LLM cost-optimisation lever really buys."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The project root (where conf/, outputs/ and run.py live); outputs and the default MLflow store are
# anchored here so a run started from any working directory lands in the same place.
ROOT = Path(os.environ.get("COSTLAB_ROOT", Path(__file__).resolve().parents[2])).resolve()
CONF_DIR = ROOT / "conf"

if not OmegaConf.has_resolver("costlab.root"):
    OmegaConf.register_new_resolver("costlab.root", lambda: str(ROOT))


def quiet_third_party_notes() -> None:
    """Keep two libraries' import-time notes out of a run's output: torchao, which ``transformers`` imports when it
    is installed, warns about every CUDA kernel library a machine cannot load (a CPU machine: all of them) and
    about Triton's absence; torch warns about torchao's enum registrations. Their errors still show."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
