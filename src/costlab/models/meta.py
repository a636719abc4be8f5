"""Models built on the meta device: shapes and dtypes without memory or compute (the launcher's checks, the
memory model's states, a plan's parameter and FLOP counts)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _unfilled(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.nn.init``'s fills inside :func:`on_meta`: a meta tensor has no values to fill."""
    return tensor


@contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device with ``torch.nn.init``'s fills as no-ops: a meta tensor has no values to
    fill, and the meta kernels of some fills (``normal_``, as an ``nn.Embedding`` draws its weight) import
    ``torch._dynamo``, ~2 s of a launcher's start on 2 cores that no check needs."""
    import torch
    from torch.nn import init

    fills = {n: f for n, f in vars(init).items() if n.endswith("_") and not n.startswith("_") and callable(f)}
    try:
        for name in fills:
            setattr(init, name, _unfilled)
        with torch.device("meta"):
            yield
    finally:
        for name, fill in fills.items():
            setattr(init, name, fill)
        _restore_recorded_fills(fills)


def _restore_recorded_fills(fills: dict[str, Any]) -> None:
    """``transformers`` records ``torch.nn.init``'s fills when it is first imported
    (``transformers.initialization.TORCH_INIT_FUNCTIONS``) and initialises every model it builds through them.
    First imported inside :func:`on_meta` (a worker's memory prediction builds a Hugging Face model there before
    the worker builds the one it trains), it had recorded the no-ops, and every model the process built after kept
    PyTorch's default init instead of its own: an embedding's std 1.0 and q_proj's 0.05 rather than the config's
    ``initializer_range`` 0.02, on rank 0 only, so FSDP and pipeline ranks started from different weights."""
    recorded = getattr(sys.modules.get("transformers.initialization"), "TORCH_INIT_FUNCTIONS", None)
    if isinstance(recorded, dict):
        for name, fill in list(recorded.items()):
            if fill is _unfilled and name in fills:
                recorded[name] = fills[name]
