"""``pp``: pipeline parallelism with ``torch.distributed.pipelining``.

The blocks are split evenly into stages, torchtitan-style: every rank builds the whole model from the
same seed, and each stage keeps its own blocks (under their original names) and drops the rest; the
first stage keeps the embeddings, the last the final norm and head. ``gpipe`` and ``1f1b`` place one
stage per rank; ``interleaved_1f1b`` places ``stages_per_rank`` stages on each rank, round-robin.

Tied embeddings (``lm_head.weight is wte.weight``): the first and the last stage each hold a copy,
identical at start (same seed); after every backward their gradients are summed between the two
ranks, as Megatron does, so both copies take identical optimizer steps and stay equal. Gradient
clipping counts the tied gradient once.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from costlab.parallelism.core import DistEnv, Parallel, clip_grad_norm_, load_full_state
from costlab.parallelism.techniques import apply_ac, apply_compile, apply_fp8
from costlab.precision import autocast

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def stage_module(part: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Cut ``part`` down, in place, to stage ``stage``'s blocks (names kept: "blocks.5" stays "blocks.5")."""
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


def apply_pp(model: nn.Module, cfg: DictConfig, env: DistEnv) -> Parallel:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    p, t = cfg.parallelism, cfg.trainer
    pp, rank, device = env.world_size, env.rank, env.device
    looped = p.schedule == "interleaved_1f1b"
    n_stages = pp * (int(p.stages_per_rank) if looped else 1)
    stage_ids = list(range(rank, n_stages, pp))  # round-robin: rank r runs stages r, r+pp, ...
    first, last = 0, n_stages - 1
    last_rank = last % pp
    tied = model.config.tie_weights and model.lm_head.weight is model.wte.weight

    apply_fp8(model, cfg)
    # the last stage of this rank is cut from the model itself (the caller's reference then holds one
    # stage, not the whole model); earlier ones from copies taken before that cut
    parts = {s: stage_module(copy.deepcopy(model), s, n_stages) for s in stage_ids[:-1]}
    parts[stage_ids[-1]] = stage_module(model, stage_ids[-1], n_stages)
    for part in parts.values():
        apply_ac(part, cfg)
        apply_compile(part, cfg)
        part.to(device)
    stages = [PipelineStage(parts[s], s, n_stages, device) for s in stage_ids]

    # The schedule sums the micro-batch losses' gradients (scale_grads=False): each micro-batch loss
    # is pre-divided by micro-batches x accumulation steps, so the gradient is that of the mean loss,
    # and accumulation over several schedule steps is not rescaled behind our back.
    from costlab.train import loss_fn

    micro = int(p.microbatches)
    scale = 1.0 / (micro * t.grad_accum_steps)

    def stage_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, target) * scale

    if looped:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=micro, loss_fn=stage_loss, scale_grads=False)
    else:
        cls = ScheduleGPipe if p.schedule == "gpipe" else Schedule1F1B
        schedule = cls(stages[0], n_microbatches=micro, loss_fn=stage_loss, scale_grads=False)

    # the two ranks holding the tied weight's copies; every rank must take part in creating a group
    tie_group = dist.new_group([first % pp, last_rank]) if tied else None
    tied_copy = None  # this rank's copy of the tied weight
    if tied and first in parts:
        tied_copy = parts[first].wte.weight
    elif tied and last in parts:
        tied_copy = parts[last].lm_head.weight
    has_first, has_last = first in parts, last in parts

    def forward_backward(parallel: Parallel, x: torch.Tensor, y: torch.Tensor, cfg: DictConfig, scaler) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for xm, ym in zip(x.chunk(t.grad_accum_steps), y.chunk(t.grad_accum_steps), strict=True):
            losses: list[torch.Tensor] = []
            args = (xm,) if has_first else ()
            with autocast(cfg, device):
                schedule.step(*args, target=ym, losses=losses, return_outputs=False)
            if has_last:
                total += torch.stack([loss.detach() for loss in losses]).sum()
        if tied_copy is not None:
            dist.all_reduce(tied_copy.grad, group=tie_group)
        return total

    def reduce_loss(loss: torch.Tensor) -> torch.Tensor:
        loss = loss.detach().clone()
        dist.broadcast(loss, src=last_rank)  # only the last stage computed it
        return loss

    @torch.no_grad()
    def evaluate(batches: list) -> float:
        """A plain sequential pass through the stages (activations sent rank to rank): evaluation
        shapes differ from training's micro-batches, which the schedule's stages have fixed."""
        for part in parts.values():
            part.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        width = cfg.model.n_embd
        for x, y in batches:
            for s in range(n_stages):  # every rank walks the stages in order: sends meet receives
                if s % pp != rank:
                    continue
                if s == first:
                    h = x.to(device)
                else:
                    h = torch.empty(x.size(0), x.size(1), width, dtype=torch.float32, device=device)
                    dist.recv(h, src=(s - 1) % pp)
                with autocast(cfg, device):
                    out = parts[s](h)
                if s == last:
                    total[0] += loss_fn(out, y.to(device)).double() * y.numel()
                    total[1] += y.numel()
                else:
                    dist.send(out.float().contiguous(), dst=(s + 1) % pp)
        dist.broadcast(total, src=last_rank)
        for part in parts.values():
            part.train()
        return float(total[0] / total[1])

    def full_model() -> nn.Module | None:
        # every rank sends its stages' weights to rank 0, which loads them into one fresh model
        state = {k: v.detach().cpu() for part in parts.values() for k, v in part.state_dict().items()}
        gathered: list | None = [None] * pp if env.is_main else None
        dist.gather_object(state, gathered, dst=0)
        if not env.is_main:
            return None
        merged: dict[str, torch.Tensor] = {}
        for piece in gathered:
            merged.update(piece)
        return load_full_state(merged, cfg, device)

    exclude = [parts[last].lm_head.weight] if tied and has_last else []  # counted on the first stage
    return Parallel(
        model=nn.ModuleList(parts.values()),
        forward_backward=forward_backward,
        reduce_loss=reduce_loss,
        evaluate=evaluate,
        full_model=full_model,
        clip_grad_norm=lambda params, max_norm: clip_grad_norm_(params, max_norm, dist.group.WORLD, exclude),
    )
