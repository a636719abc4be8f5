"""The bytes glibc's allocator has handed out: on CPU, what ``torch.cuda.memory_allocated`` is on a GPU.

PyTorch's CPU tensors come from ``malloc`` (its default CPU allocator, without a caching layer), so the bytes
glibc holds for the process's callers, read by ``mallinfo2`` (its heap chunks in use in every arena, and the
blocks it mmapped for large requests), move with every tensor made and freed. Read after each op of a step
(:class:`AllocatorPeak`), the largest reading less the one before the step is the step's own peak: its gradients,
activations, collectives' buffers and FSDP's gathered parameters, beside the memory model's parts
(``mem/predicted_step_allocated_bytes_per_rank``). Besides tensors it counts what C++ allocates with ``malloc``
(the autograd graph's nodes, a process group's buffers), and not what an op allocates and frees inside itself.
The trainer reads a run's second step where that is a warm-up step: its first also makes what a process makes
once (FSDP's lazy initialisation, gloo's first collectives' buffers, first-call workspaces), which outweighs a
tiny model's tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# measured on CPU: the most bytes glibc's allocator held during a warm-up step beyond those it held as the step began;
# beside mem/predicted_step_allocated_bytes_per_rank
MEM_STEP_ALLOCATED = "mem/step_allocated_bytes_per_rank"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def malloc_meter() -> Callable[[], int] | None:
    """A function of no arguments that reads the bytes glibc's allocator has handed out (its heap chunks in use
    and its mmapped blocks), or None where there is none to read: not glibc, a glibc older than 2.33 (no
    ``mallinfo2``), or another allocator preloaded (jemalloc's or tcmalloc's ``mallinfo2`` reads nothing)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        read = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    read.restype = _MallInfo2

    def in_use() -> int:
        info = read()
        return int(info.uordblks + info.hblkhd)

    return in_use if in_use() > 0 else None


class AllocatorPeak(TorchDispatchMode):
    """Reads ``in_use`` (:func:`malloc_meter`'s reader) as it is entered and after every op under it:
    ``allocated`` is the most it read beyond its first reading."""

    def __init__(self, in_use: Callable[[], int]):
        super().__init__()
        self.in_use = in_use
        self.start = self.peak = 0

    def __enter__(self) -> AllocatorPeak:
        self.start = self.peak = self.in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out

    @property
    def allocated(self) -> int:
        return self.peak - self.start
