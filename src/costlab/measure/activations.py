"""The activation bytes a training step really holds for backward, measured beside the memory model's
prediction (:func:`costlab.measure.memory.activation_parts`).

A :class:`torch.utils._python_dispatch.TorchDispatchMode` sees every op of the step. Each storage an op of a
forward pass creates (any op outside a backward pass: custom autograd functions' insides and collectives
included) is counted once, until it is freed; parameters and buffers are never counted. As each backward pass
starts (the step's, or each micro-batch's), the bytes created by forward passes and still alive are read: their
largest value is ``mem/activations_bytes_per_rank``, the bytes held for backward at the step's peak. A tensor
subclass (a DTensor, a float8 tensor) counts as the plain tensors that hold its data. That counts:

- what autograd saves, each storage once however many views or ops save it;
- what a checkpointed block keeps (its input: the block's own saves are hidden behind checkpointing's hooks and
  rebuilt in backward, so they are not held);
- every micro-batch in flight on a pipeline stage (1F1B's first stage holds the most), and only one micro-batch at
  a time under gradient accumulation, which frees each one's activations in its backward;
- autocast's cast copies of weights, and the stage outputs a pipeline's schedule keeps for their backward (the
  last stage's logits among them; the trainer frees its own logits before backward, as nothing saves them).

Temporaries a forward frees before backward starts are not held and not counted; nor are gradients, nor the
blocks checkpointing rebuilds in backward. A collective's buffers are one such temporary, but a process group's
worker thread lets go of them a moment after the collective's waiter has woken: a reading that finds a buffer a
collective touched still alive pauses (``SETTLE_S``, the GIL released) and reads again, keeping the smallest
reading, so a loaded machine's late worker is not counted as held for backward. The measurement costs the step it
runs in a Python call per op, so the trainer takes it on a warm-up step, which throughput figures leave out.
"""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MEM_ACTIVATIONS = "mem/activations_bytes_per_rank"  # measured; beside mem/predicted_activations_bytes_per_rank
UNMEASURED_TAG = "costlab.activations_unmeasured"  # why a run has no measured activation bytes
# the pauses a reading takes while a collective's buffer is alive, for its worker thread to let go (see the module)
SETTLE_S = (0.001, 0.004, 0.015, 0.05, 0.1, 0.15)
COLLECTIVES = ("_c10d_functional", "c10d")  # the op namespaces whose buffers a process group's worker holds


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class SavedActivations(TorchDispatchMode):
    """Counts the bytes the forward passes under it leave alive, read as each backward pass starts (see the
    module). ``held`` is the largest reading; the parameters and buffers of ``modules`` are never counted, nor
    are the tensors they hold when a reading is taken (FSDP's gathered parameters)."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.modules = modules
        self.skip = self._weights()
        self.forward: dict[int, weakref.ref] = {}  # storage key -> the storage, created by a forward pass
        self.collective: set[int] = set()  # storage keys a collective op took or gave (its worker may hold them)
        self.backward = False  # whether the last op ran in a backward pass
        self.held = 0

    def _weights(self) -> set[int]:
        return {_key(t) for m in self.modules for t in [*m.parameters(), *m.buffers()] for t in _plain(t)}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        backward = _in_backward()
        if backward and not self.backward:
            self.held = max(self.held, self.alive())
        self.backward = backward
        out = func(*args, **(kwargs or {}))
        if not backward:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    for plain in _plain(t):
                        self._count(plain.untyped_storage())
        if func.namespace in COLLECTIVES:
            self.collective.update(_key(p) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)
                                   for p in _plain(t))
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key not in self.forward and key not in self.skip:
            self.forward[key] = weakref.ref(storage, lambda _, key=key: self._forget(key))

    def _forget(self, key: int) -> None:
        self.forward.pop(key, None)
        self.collective.discard(key)  # a new storage may come to live at the same address

    def alive(self) -> int:
        """Bytes of the storages forward passes created that are alive now, weights excluded. Sizes are read
        now: FSDP frees a gathered parameter by resizing its storage to nothing. While a storage a collective
        touched is alive, the reading pauses and reads again (``SETTLE_S``; see the module)."""
        gc.collect()  # a storage only a reference cycle holds is garbage already: freed now, not when gc happens to run
        weights = self._weights()
        held = self._bytes(weights)
        for pause in SETTLE_S:
            if not self.collective.intersection(self.forward):
                break
            time.sleep(pause)
            held = min(held, self._bytes(weights))
        return held

    def _bytes(self, weights: set[int]) -> int:
        storages = [(key, ref()) for key, ref in list(self.forward.items())]
        return sum(s.nbytes() for key, s in storages if s is not None and key not in weights)


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: a DTensor's local shard, a tensor subclass's inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, name) for name in names]
        return [p for i in inner if isinstance(i, torch.Tensor) for p in _plain(i)]
    return [] if t.is_meta else [t]


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def unmeasured_reason(cfg: Any) -> str | None:
    """Why a run cannot measure its activations without disturbing what it measures (None: it can)."""
    t = cfg.trainer
    if int(t.timing_warmup_steps) < 1:
        return "trainer.timing_warmup_steps=0: every step is timed, and the measurement slows the step it runs in"
    if bool(t.get("compile", False)):
        return "trainer.compile=true: a compiled step runs its ops inside generated code, out of the counter's sight"
    return None
