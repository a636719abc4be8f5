"""What every option of the ``parallelism`` group shares: the process group, the :class:`Parallel`
record the trainer reads, gradient clipping over sharded gradients, and the way trained weights come
back into one plain module on rank 0."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DictConfig) -> DistEnv:
    """Join the process group torchrun set up: gloo on CPU, nccl on GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if "RANK" in os.environ and cfg.trainer.nnodes > 1:
        # c10d rendezvous numbers nodes by host name and pid, not by --node-rank. Global rank 0 must
        # live on node 0, whose run.py owns the MLflow run and the run folder, so costlab numbers the
        # ranks itself: node-major, as a static rendezvous would.
        os.environ["RANK"] = str(cfg.trainer.node_rank * local_world + local_rank)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.trainer.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # equal cores per local rank: runs at different world sizes use the same hardware
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(minutes=30), device_id=device if backend == "nccl" else None
        )
    return DistEnv(rank, local_rank, world, local_world, device)


@dataclass
class Parallel:
    """What the trainer needs to know about a parallelised model."""

    model: nn.Module  # the module the optimizer trains and the forward pass calls
    dp_rank: int = 0  # which slice of the global batch this rank takes
    dp_size: int = 1  # how many slices the global batch is cut into
    dp_group: dist.ProcessGroup | None = None  # the group the logged loss is averaged over
    # gradient-sync suppression for all but the last micro-batch (DDP's no_sync)
    no_sync: Callable[[], object] | None = None
    # returns the full trained model on rank 0 (None elsewhere); every rank must call it
    full_model: Callable[[], nn.Module | None] = field(default=lambda: None)
    # overrides for schemes whose step is not "forward, loss, backward" (pipelining):
    # forward_backward(parallel, x, y, cfg, scaler) -> mean loss of this rank
    forward_backward: Callable | None = None
    # reduce_loss(loss) -> the global mean loss, valid on rank 0
    reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    # evaluate(batches) -> mean validation loss, called on every rank
    evaluate: Callable | None = None
    # clip_grad_norm(params, max_norm) -> total norm of the *global* gradient, for sharded or staged
    # gradients that torch.nn.utils.clip_grad_norm_ would only see a piece of
    clip_grad_norm: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None


def has_blocks(model: nn.Module) -> bool:
    return isinstance(getattr(model, "blocks", None), nn.ModuleDict)


def plain_copy(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    """A fresh, unwrapped model holding ``model``'s weights: what rank 0 compresses, saves and times.

    Float8 linears, compiled blocks and checkpoint hooks are training devices; the shipped model must
    not carry them.
    """
    from costlab.model import build_model

    fresh = build_model(cfg.model)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(device)


def load_full_state(state: dict[str, torch.Tensor], cfg: DictConfig, device: torch.device) -> nn.Module:
    from costlab.model import build_model

    fresh = build_model(cfg.model)
    fresh.load_state_dict(state)
    return fresh.to(device)


def _local(t: torch.Tensor) -> torch.Tensor:
    # a DTensor's shard on this rank (the same storage: in-place scaling reaches the DTensor)
    return t._local_tensor if hasattr(t, "_local_tensor") else t


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    extra_group: dist.ProcessGroup | None = None,
    exclude: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that are spread over ranks.

    The squared norm of each local piece is summed over the mesh dimensions its DTensor is *sharded*
    on (a replicated piece is counted once), then over ``extra_group`` (pipeline stages, which hold
    different parameters). ``exclude`` names parameters counted elsewhere (a tied weight's second
    copy). Every rank returns the same norm and scales its pieces by the same factor.
    """
    params = [p for p in params if p.grad is not None]
    skip = {id(p) for p in exclude}
    device = params[0].grad.device if params else torch.device("cpu")
    sums: dict[object, torch.Tensor] = {}
    for p in params:
        if id(p) in skip:
            continue
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if hasattr(g, "device_mesh") else None
        sq = _local(g).detach().float().pow(2).sum()
        sums[key] = sums[key] + sq if key in sums else sq
    total = torch.zeros((), dtype=torch.float32, device=device)
    for key, sq in sums.items():  # the same keys in the same order on every rank of a mesh
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if not placement.is_replicate():  # Shard or FSDP's _StridedShard (gradients are never Partial)
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total += sq
    if extra_group is not None:
        dist.all_reduce(total, group=extra_group)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        _local(p.grad).mul_(coef.to(p.grad.dtype))
    return norm


@torch.no_grad()
def sharded_evaluate(
    model: nn.Module, batches: list, cfg: DictConfig, device: torch.device, dp_rank: int, dp_size: int, group
) -> float:
    """Mean loss with every rank running the *same number* of forward passes.

    FSDP's all-gathers and TP's all-reduces are collectives: a rank that skipped a batch would hang
    its peers. Each data-parallel rank takes its rows of every batch instead.
    """
    from costlab.precision import autocast
    from costlab.train import loss_fn

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        xs, ys = x.tensor_split(dp_size)[dp_rank], y.tensor_split(dp_size)[dp_rank]
        empty = xs.size(0) == 0
        if empty:  # fewer rows than ranks: still take part in the collectives, count nothing
            xs, ys = x[:1], y[:1]
        with autocast(cfg, device):
            logits = model(xs.to(device))
        if not empty:
            total[0] += loss_fn(logits, ys.to(device)).double() * ys.numel()
            total[1] += ys.numel()
    if dp_size > 1:
        dist.all_reduce(total, group=group)
    model.train(was_training)
    return float(total[0] / total[1])
