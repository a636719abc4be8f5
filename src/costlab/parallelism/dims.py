"""Parallelism as degrees, torchtitan-style: data-parallel replicate (DDP), data-parallel shard (FSDP),
tensor and pipeline. Their product is the world size, checked once, here.

The ``parallelism`` options only set degrees (``fsdp_tp`` is ``dp_shard`` × ``tp_degree``, ``hsdp`` is
``dp_replicate`` × ``dp_shard``: FSDP2's hybrid sharding; ``dp_replicate`` alone is DDP), so a layout
such as pipeline × FSDP or pipeline × TP needs no code path of its own. Torch-free: the launcher reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from costlab.schema import ConfigError

# config key -> field, in mesh order (outermost first): pipeline stages talk least, tensor parallel most
DEGREE_KEYS = {"pp_degree": "pp", "dp_replicate": "dp_replicate", "dp_shard": "dp_shard", "tp_degree": "tp"}


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """How many slices the global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp_enabled(self) -> bool:
        """DistributedDataParallel wraps the model: replicas of unsharded weights."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def hsdp_enabled(self) -> bool:
        """FSDP2's hybrid sharding: ``dp_replicate`` replicas of ``dp_shard`` shards (no DDP wrapper)."""
        return self.dp_replicate > 1 and self.dp_shard > 1

    def mesh_dims(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Names and sizes of the device mesh: the enabled degrees, outermost first."""
        dims = [(f, getattr(self, f)) for f in DEGREE_KEYS.values() if getattr(self, f) > 1]
        return tuple(n for n, _ in dims), tuple(s for _, s in dims)


def parallel_dims(p: Any, world: int) -> ParallelDims:
    """Read the degrees of a ``parallelism`` config; at most one may be -1 ("the rest of the world")."""
    given: dict[str, int] = {}
    for key in DEGREE_KEYS:
        value = p.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(f"parallelism.{key}", value, "must be a positive integer, or -1 for the rest "
                              "of the world")
        given[key] = value
    free = [k for k, v in given.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"parallelism.{free[1]}", -1, f"only one degree may be -1; parallelism.{free[0]} is too")
    fixed = math.prod(v for v in given.values() if v != -1)
    if free:
        if world % fixed:
            key = next(k for k, v in given.items() if v not in (-1, 1))
            raise ConfigError(f"parallelism.{key}", given[key], f"must divide the world size {world} "
                              f"(trainer.nnodes x trainer.nproc_per_node); {_describe(given)}")
        given[free[0]] = world // fixed
    if math.prod(given.values()) != world:
        key = next((k for k, v in p.items() if k in DEGREE_KEYS and v not in (-1, 1)), "pp_degree")
        raise ConfigError(f"parallelism.{key}", given[key], f"the degrees {_describe(given)} multiply to "
                          f"{math.prod(given.values())}, but the world size (trainer.nnodes x "
                          f"trainer.nproc_per_node) is {world}")
    return ParallelDims(**{DEGREE_KEYS[k]: v for k, v in given.items()})


def _describe(given: dict[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in given.items())
