"""What every layout shares: the process group, and :class:`Parallel`, the model as one rank trains it.

``Parallel`` is a model on one device; the layouts that differ override one method each:
:class:`~costlab.parallelism.ddp.DataParallel` (gradient sync only on the last micro-batch),
:class:`ShardedParallel` (DTensor parameters: FSDP and/or tensor parallel) and
:class:`~costlab.parallelism.pp.PipelineParallel` (stages and a schedule).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from costlab.models.adapters import apply_finetune, dense_state, dequantized, is_nf4, merge_adapters, uses_adapters
from costlab.models.gpt import build_model
from costlab.models.loss import evaluate, loss_fn
from costlab.precision import autocast


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: DictConfig) -> DistEnv:
    """Join the process group torchrun set up: gloo on CPU, nccl on GPU (and gloo for the CPU tensors of
    ``parallelism.offload=cpu``)."""
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
        # FSDP2's CPU offload keeps gradients on the host, where the gradient norm's all-reduce then runs:
        # gloo beside nccl for CPU tensors (as torchtitan does for CPU offload)
        backend = "cuda:nccl,cpu:gloo" if cfg.parallelism.get("offload", "none") == "cpu" else "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # equal cores per local rank: runs at different world sizes use the same hardware
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "RANK" in os.environ and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        store = None
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun restarted the workers (trainer.max_restarts) but may hand them the same agent store, where
            # the dead attempt's peer addresses still sit: a key prefix of this attempt keeps them apart
            agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                  timeout=timeout)
            store = dist.PrefixStore(f"costlab/attempt_{attempt}", agent)
        dist.init_process_group(
            backend, timeout=timeout, device_id=device if "nccl" in backend else None, store=store,
            rank=rank if store is not None else -1, world_size=world if store is not None else -1,
        )
    return DistEnv(rank, local_rank, world, local_world, device)


def plain_copy(model: nn.Module, cfg: DictConfig, device: torch.device) -> nn.Module:
    """A fresh, unwrapped model holding ``model``'s weights: float8 linears, compiled blocks, checkpoint hooks
    and LoRA adapters (merged into the weights) are training devices the shipped model must not carry."""
    return load_full_state(model.state_dict(), cfg, device)


def load_full_state(state: dict[str, torch.Tensor], cfg: DictConfig, device: torch.device) -> nn.Module:
    """A fresh model of ``cfg.model`` as the ``finetune`` option trained it, holding ``state``; its adapters,
    if any, merged into its weights (a base held in NF4 dequantized first)."""
    fresh = apply_finetune(build_model(cfg.model), cfg, quantize=False)  # an NF4 base comes back dense
    fresh.load_state_dict(dense_state(state))
    return merge_adapters(fresh).to(device) if uses_adapters(cfg) else fresh.to(device)


class Parallel:
    """The model as this rank trains it, and the few things a layout changes about training.

    ``model`` is the module the optimizer trains; ``dp_rank``/``dp_size`` say which slice of the global
    batch this rank takes; ``rebuild`` says the trained module carries training devices (float8, compile,
    checkpointing), so the shipped model is rebuilt from its weights.
    """

    def __init__(self, model: nn.Module, device: torch.device | None = None, rebuild: bool = False,
                 dp_rank: int = 0, dp_size: int = 1, dp_group: dist.ProcessGroup | None = None):
        self.model = model
        self.device = device if device is not None else next(model.parameters()).device
        self.rebuild = rebuild
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group

    def sync_gradients(self, last_microbatch: bool) -> contextlib.AbstractContextManager:
        """Where gradients are reduced after each backward, whether to do so for this micro-batch."""
        return contextlib.nullcontext()

    def gradients_to_none(self, cfg: DictConfig) -> bool:
        """Whether the optimizer sets the gradients to None after its step (``zero_grad(set_to_none=True)``, freeing
        them until the next backward makes them) rather than zeroing them where they are."""
        return True

    def forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, scaler: torch.amp.GradScaler | None
    ) -> torch.Tensor:
        """Forward and backward over ``grad_accum_steps`` micro-batches; the mean loss (detached) of this rank."""
        accum = cfg.trainer.grad_accum_steps
        total = torch.zeros((), device=x.device)
        for i, (xm, ym) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
            with self.sync_gradients(i == accum - 1):
                with autocast(cfg, x.device):
                    logits = self.model(xm)
                loss = loss_fn(logits, ym) / accum
                del logits  # nothing saves them for backward (the loss keeps its log-softmax): freed before it
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.detach()
        return total

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The mean loss of the whole global batch, valid on rank 0."""
        if self.dp_size == 1:
            return loss
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=self.dp_group)  # gloo has no AVG
        return loss / self.dp_size

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the gradient of the whole model to ``max_norm``; returns its norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: DictConfig) -> float:
        """Mean validation loss, called on every rank."""
        return evaluate(self.model, batches, cfg, self.device, self.dp_rank, self.dp_size, self.dp_group)

    def full_model(self, cfg: DictConfig) -> nn.Module | None:
        """The whole trained model as one plain module on rank 0 (None elsewhere); every rank calls it."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return plain_copy(self.model, cfg, self.device) if self.rebuild else self.model


class ShardedParallel(Parallel):
    """Parameters are DTensors (FSDP shards and/or tensor-parallel pieces): the gradient norm and the
    full model are collectives over the mesh."""

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(params, max_norm)

    def full_model(self, cfg: DictConfig) -> nn.Module | None:
        # distributed checkpointing is slow to import, and only sharded layouts need it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.tensor import DTensor

        # the sharded state under the plain model's names (no collective); each DTensor is gathered whole here
        # (a collective), and only rank 0 keeps it
        main = dist.get_rank() == 0
        state = {}
        for name, value in get_model_state_dict(self.model).items():
            whole = gather_whole(value) if isinstance(value, DTensor) else value
            if main:
                state[name] = whole.detach().cpu()
        return load_full_state(state, cfg, self.device) if main else None


def gather_whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` gathered whole on every rank (a collective). A shard held in NF4 is dequantized and gathered dense:
    torchao's gather of an ``NF4Tensor`` through DTensor is never waited on, so its pieces were read before the
    collective had filled them (and gloo runs that did so aborted, 1 in about 8, with a corrupted heap)."""
    from torch.distributed.tensor import DTensor

    assert isinstance(t, DTensor)
    local = t.to_local()
    if is_nf4(local):
        t = DTensor.from_local(dequantized(local), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor()


def _local(t: torch.Tensor) -> torch.Tensor:
    # a DTensor's shard on this rank: a view of the same storage, so in-place ops (a collective on a tied
    # weight's gradient) reach the DTensor
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    extra_group: dist.ProcessGroup | None = None,
    exclude: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that are spread over ranks.

    ``get_total_norm`` of DTensor gradients is a DTensor whose norm is partial over the mesh dimensions
    they are sharded on (a replicated piece counts once); ``full_tensor()`` reduces it. What no torch
    helper knows is ``extra_group``: pipeline stages hold different parameters, so their squared norms
    are summed over it here. ``exclude`` names parameters counted elsewhere (a tied weight's second
    copy): their gradients are clipped, not counted. Every rank returns the same norm and scales its
    pieces by the same factor.
    """
    from torch.distributed.tensor import DTensor  # slow to import; only layouts with several ranks get here

    params = [p for p in params if p.grad is not None]
    skip = {id(p) for p in exclude}
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in skip])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if extra_group is not None:
        squared = norm.pow(2)
        dist.all_reduce(squared, group=extra_group)
        norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
