"""``pp`` (degree ``pp_degree``): pipeline parallelism with ``torch.distributed.pipelining``.

The blocks are split evenly into stages, torchtitan-style: every rank builds the whole model from the
same seed, and each stage keeps its own blocks (under their original names) and drops the rest; the
first stage keeps the embeddings, the last the final norm and head. ``gpipe`` and ``1f1b`` place one
stage per rank; ``interleaved_1f1b`` places ``stages_per_rank`` stages on each rank, round-robin.
With ``dp_shard`` and/or ``tp_degree`` as well, each stage is also FSDP-sharded and/or tensor-parallel
within its slice of the mesh (3-D), by the same recipe as a whole model.

Tied embeddings (``lm_head.weight is wte.weight``): the first and the last stage each hold a copy,
identical at start (same seed); after every backward their gradients are summed between the two
ranks, as Megatron does, so both copies take identical optimizer steps and stay equal. Gradient
clipping counts the tied gradient once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from costlab.models.loss import loss_fn
from costlab.parallelism.apply import apply_parallelisms, data_parallel_group
from costlab.parallelism.core import DistEnv, Parallel, _local, clip_grad_norm_, load_full_state
from costlab.parallelism.dims import ParallelDims
from costlab.precision import autocast

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_module(part: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Cut ``part`` down, in place, to stage ``stage``'s blocks (names kept: "blocks.5" stays "blocks.5")."""
    if getattr(part, "hf", None) is not None:  # model=hf
        part.cut_to_stage(stage, n_stages)
        return part
    per_stage = len(part.blocks) // n_stages
    keep = {str(i) for i in range(stage * per_stage, (stage + 1) * per_stage)}
    for name in list(part.blocks.keys()):
        if name not in keep:
            del part.blocks[name]
    if stage > 0:  # GPT.forward treats its input as the hidden state when wte is None
        part.wte, part.wpe = None, None
    if stage < n_stages - 1:
        part.ln_f, part.lm_head = None, None
    return part


class PipelineParallel(Parallel):
    """This rank's stages of the pipeline, and the schedule that runs micro-batches through them."""

    def __init__(self, model: nn.Module, cfg: DictConfig, env: DistEnv, dims: ParallelDims, mesh: DeviceMesh,
                 stage: Callable[..., PipelineStage] = PipelineStage):
        """``stage``: what builds each of this rank's stages from (its module, index, number of stages, device,
        group=); :func:`lone_stages` for a rank without its peers."""
        p, t = cfg.parallelism, cfg.trainer
        pp_mesh = mesh["pp"]
        self.pp, self.pp_group = dims.pp, pp_mesh.get_group()
        pp_rank = pp_mesh.get_local_rank()
        looped = p.schedule == "interleaved_1f1b"
        self.n_stages = dims.pp * (int(p.stages_per_rank) if looped else 1)
        stage_ids = list(range(pp_rank, self.n_stages, dims.pp))  # round-robin: rank r runs stages r, r+pp, ...
        self.first, self.last = 0, self.n_stages - 1
        self.last_rank = self.last % dims.pp  # the pipeline rank of the last stage
        self.pp_rank = pp_rank
        tied = model.config.tie_weights and model.lm_head.weight is model.wte.weight
        self.width = model.config.n_embd  # of the hidden state passed between stages

        # the last stage of this rank is cut from the model itself (the caller's reference then holds one
        # stage, not the whole model); earlier ones from copies taken before that cut
        parts = {s: stage_module(copy.deepcopy(model), s, self.n_stages) for s in stage_ids[:-1]}
        parts[stage_ids[-1]] = stage_module(model, stage_ids[-1], self.n_stages)
        for part in parts.values():
            apply_parallelisms(part, cfg, dims, mesh, env.device)
        self.parts = parts
        stages = [stage(parts[s], s, self.n_stages, env.device, group=self.pp_group) for s in stage_ids]

        # The schedule sums the micro-batch losses' gradients (scale_grads=False): each micro-batch loss
        # is pre-divided by micro-batches x accumulation steps, so the gradient is that of the mean loss,
        # and accumulation over several schedule steps is not rescaled behind our back.
        micro = int(p.microbatches)
        scale = 1.0 / (micro * t.grad_accum_steps)

        def stage_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss_fn(logits, target) * scale

        schedule_cls = SCHEDULES[p.schedule]
        self.schedule = schedule_cls(stages if looped else stages[0], n_microbatches=micro, loss_fn=stage_loss,
                                     scale_grads=False)

        super().__init__(nn.ModuleList(parts.values()), env.device, True, *data_parallel_group(dims, mesh))

        # the pairs of ranks holding the tied weight's copies, one pair per (dp, tp) coordinate; every
        # rank must take part in creating every group
        self.tie_group = None
        self.tied_copy = None  # this rank's copy of the tied weight
        if tied:
            columns = mesh.mesh.reshape(dims.pp, -1)  # pp is the outermost mesh dimension
            for c in range(columns.size(1)):
                ranks = [int(columns[self.first % dims.pp, c]), int(columns[self.last_rank, c])]
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    self.tie_group = group
            if self.first in parts:
                self.tied_copy = parts[self.first].wte.weight
            elif self.last in parts:
                self.tied_copy = parts[self.last].lm_head.weight
        # counted on the first stage
        self.exclude = [parts[self.last].lm_head.weight] if tied and self.last in parts else []
        # the whole model's weights are gathered from the ranks at mesh coordinate 0 of every other degree
        self.gathers = all(int(mesh[n].get_local_rank()) == 0 for n in mesh.mesh_dim_names if n != "pp")

    def _pp_global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.pp_group, pp_rank)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, scaler) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        accum = cfg.trainer.grad_accum_steps
        for xm, ym in zip(x.chunk(accum), y.chunk(accum), strict=True):
            losses: list[torch.Tensor] = []
            args = (xm,) if self.first in self.parts else ()
            with autocast(cfg, self.device):
                self.schedule.step(*args, target=ym, losses=losses, return_outputs=False)
            if self.last in self.parts:
                total += torch.stack([loss.detach() for loss in losses]).sum()
        if self.tied_copy is not None and self.tied_copy.requires_grad:  # (frozen under LoRA: no gradient)
            # under tensor parallel both copies' gradients are split by rows, as their weights are
            dist.all_reduce(_local(self.tied_copy.grad), group=self.tie_group)
        return total

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        loss = loss.detach().clone()
        dist.broadcast(loss, src=self._pp_global(self.last_rank), group=self.pp_group)  # only the last stage has it
        return super().global_loss(loss)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(params, max_norm, self.pp_group, self.exclude)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: DictConfig) -> float:
        """A plain sequential pass through the stages (activations sent rank to rank): evaluation
        shapes differ from training's micro-batches, which the schedule's stages have fixed. Each
        data-parallel rank takes its rows of every batch, as :func:`costlab.models.loss.evaluate` does."""
        for part in self.parts.values():
            part.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        width = self.width
        for x, y in batches:
            xs, ys = x.tensor_split(self.dp_size)[self.dp_rank], y.tensor_split(self.dp_size)[self.dp_rank]
            empty = xs.size(0) == 0
            if empty:  # fewer rows than ranks: still take part in the collectives, count nothing
                xs, ys = x[:1], y[:1]
            for s in range(self.n_stages):  # every rank walks the stages in order: sends meet receives
                if s % self.pp != self.pp_rank:
                    continue
                if s == self.first:
                    h = xs.to(self.device)
                else:
                    h = torch.empty(xs.size(0), xs.size(1), width, dtype=torch.float32, device=self.device)
                    dist.recv(h, src=self._pp_global((s - 1) % self.pp), group=self.pp_group)
                with autocast(cfg, self.device):
                    out = self.parts[s](h)
                if s == self.last:
                    if not empty:
                        total[0] += loss_fn(out, ys.to(self.device)).double() * ys.numel()
                        total[1] += ys.numel()
                else:
                    dist.send(out.float().contiguous(), dst=self._pp_global((s + 1) % self.pp), group=self.pp_group)
        dist.broadcast(total, src=self._pp_global(self.last_rank), group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(total, group=self.dp_group)
        for part in self.parts.values():
            part.train()
        return float(total[0] / total[1])

    def full_model(self, cfg: DictConfig) -> nn.Module | None:
        """Every stage's weights go to rank 0, which loads them into one fresh model."""
        state: dict[str, torch.Tensor] = {}
        for part in self.parts.values():
            # collective within the stage's FSDP/TP ranks; plain tensors come back whole
            full = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
            state.update({k: v.detach().cpu() for k, v in full.items()})
        gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(state if self.gathers else {}, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        merged: dict[str, torch.Tensor] = {}
        for piece in gathered:
            merged.update(piece)
        return load_full_state(merged, cfg, self.device)


class _LoneStage(PipelineStage):
    """A stage of a rank that runs the schedule without its peers, under PyTorch's fake process group (a plan's
    probe): its inputs' and outputs' shapes are given, not received, and the schedule's warm-up vote, whose receives
    get no data there, is taken as every stage's STATIC (what it is where every stage's shapes are given; the vote
    is PyTorch 2.13's, and a PyTorch whose schedule this cannot run costs the plan its schedule's price, said on
    stderr). What it receives in the schedule is whatever its buffers held."""

    def _warmup_forward_vote(self, has_backward: bool, received_acc: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones(1, dtype=torch.int32, device=self.device)

    def _warmup_backward_result(self, received_result: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones(1, dtype=torch.int32, device=self.device)


def lone_stages(model: nn.Module, cfg: DictConfig, n_stages: int, x: torch.Tensor) -> Callable[..., PipelineStage]:
    """What builds the stages of a rank without its peers (:class:`_LoneStage`), for ``PipelineParallel``'s
    ``stage``: each stage's input and output as ``model`` (left whole), cut into ``n_stages`` stages plain, passes
    ``x`` (one micro-batch) through them in turn under the run's autocast."""
    metas: list[tuple[torch.Tensor, torch.Tensor]] = []
    h = x
    with torch.no_grad(), autocast(cfg, x.device):
        for s in range(n_stages):
            out = stage_module(copy.deepcopy(model), s, n_stages)(h)
            metas.append((h, out))
            h = out

    def build(part: nn.Module, s: int, n: int, device: torch.device, group: dist.ProcessGroup) -> PipelineStage:
        inputs, outputs = metas[s]
        return _LoneStage(part, s, n, device, group=group,
                          input_args=inputs.detach().requires_grad_(s > 0 and inputs.is_floating_point()),
                          output_args=outputs.detach().requires_grad_(s < n - 1))

    return build
