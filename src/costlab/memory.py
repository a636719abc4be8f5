"""The memory model: the bytes each rank will hold for parameters, gradients and optimizer state,
predicted without allocating them.

The model is built on the meta device and laid out by the run's own parallelism code
(:func:`costlab.parallelism.apply.apply_parallelisms`, :func:`costlab.parallelism.pp.stage_module`)
for every rank in turn, under PyTorch's fake process group (no peers, no communication), so the
local shard shapes are exactly those the run will have. From them:

    params     = sum of the local shards' bytes (fp32 master weights; a tied weight once per stage)
    grads      = the same for the parameters that train
    optimizer  = AdamW: exp_avg + exp_avg_sq (2 x params) + a 4-byte step counter per parameter tensor

each the largest over ranks, as the measured ``mem/*_bytes_per_rank`` are. Activations are not
predicted yet.
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig

PREDICTED = "mem/predicted_"  # + params/grads/optimizer_bytes_per_rank: beside the measured figures
ADAM_STATES = 2  # exp_avg and exp_avg_sq, each the parameter's shape and dtype
STEP_BYTES = 4  # AdamW's step counter: a float32 scalar tensor per parameter


def _stage_parts(model: Any, cfg: DictConfig, dims: Any, mesh: Any) -> list[Any]:
    from costlab.parallelism.pp import stage_module

    if not dims.pp_enabled:
        return [model]
    p = cfg.parallelism
    looped = p.get("schedule") == "interleaved_1f1b"
    n_stages = dims.pp * (int(p.stages_per_rank) if looped else 1)
    pp_rank = mesh["pp"].get_local_rank()
    return [stage_module(copy.deepcopy(model), s, n_stages) for s in range(pp_rank, n_stages, dims.pp)]


def _rank_state(cfg: DictConfig, dims: Any, rank: int, world: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from costlab.model import build_model
    from costlab.parallelism.apply import apply_parallelisms, build_mesh

    with torch.device("meta"):
        model = build_model(cfg.model)
    params: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    if world > 1:  # sharded: lay the model out as this rank will
        params = {}
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            mesh = build_mesh(dims, "cpu")
            for part in _stage_parts(model, cfg, dims, mesh):
                apply_parallelisms(part, cfg, dims, mesh, torch.device("meta"))
                params.update({id(p): p for p in part.parameters()})
        finally:
            dist.destroy_process_group()

    def local_bytes(p: torch.Tensor) -> int:
        t = p.to_local() if hasattr(p, "to_local") else p
        return t.numel() * t.element_size()

    trained = [p for p in params.values() if p.requires_grad]
    param_bytes = sum(local_bytes(p) for p in params.values())
    grad_bytes = sum(local_bytes(p) for p in trained)
    return {
        f"{PREDICTED}params_bytes_per_rank": param_bytes,
        f"{PREDICTED}grads_bytes_per_rank": grad_bytes,
        f"{PREDICTED}optimizer_bytes_per_rank": ADAM_STATES * grad_bytes + STEP_BYTES * len(trained),
    }


def predict_state(cfg: DictConfig, world: int) -> dict[str, float]:
    """Predicted per-rank state bytes (largest over ranks) of ``cfg`` at ``world`` ranks. Must run in a
    process with no process group yet (the launcher, a plan, or a worker before it joins its group)."""
    from costlab.parallelism.dims import parallel_dims

    dims = parallel_dims(cfg.parallelism, world)
    sharded = world > 1 and (dims.pp_enabled or dims.fsdp_enabled or dims.tp_enabled)
    # replicas (single, ddp) all hold the whole model; shards are split with the remainder first, so rank 0
    # of each pipeline stage (pp is the outermost mesh dimension) holds the largest
    ranks = [stage * (world // dims.pp) for stage in range(dims.pp)] if sharded else [0]
    out: dict[str, float] = {}
    for rank in ranks:
        for key, value in _rank_state(cfg, dims, rank, world if sharded else 1).items():
            out[key] = max(out.get(key, 0), value)
    return out
