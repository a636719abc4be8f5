"""Models built on the meta device: shapes and dtypes without memory or compute (the launcher's checks, the
memory model's states, a plan's parameter and FLOP counts)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fill in fills.items():
            setattr(init, name, fill)
