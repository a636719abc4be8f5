"""Training checkpoints and resuming: ``trainer.checkpoint_interval``, ``trainer.max_restarts`` and
``trainer.resume``.

A checkpoint is written with ``torch.distributed.checkpoint`` (DCP) into the run folder,
``checkpoints/step_<N>/``: each rank writes its own shard of the model and of the optimizer state (FSDP
and tensor-parallel DTensors, pipeline stages), so it is as parallel as the run. Beside the shards,
``trainer.json`` holds the step, the grad scaler's state and the wall-clock time of the save, and
``rng.rank<R>.pt`` each rank's random state. A checkpoint counts only once ``trainer.json`` exists: it is
written last, after every rank's shard, so a save cut short is never resumed from. The last
``trainer.checkpoint_keep`` are kept.

The batch sampler is a function of the seed and the step, and the learning rate of the step, so a run
resumed from step N reproduces the uninterrupted run's loss curve.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from costlab import status
from costlab.files import write_whole

if TYPE_CHECKING:  # the launcher reads checkpoint folders without importing torch
    import torch

    from costlab.parallelism.core import DistEnv


CHECKPOINTS = "checkpoints"


META = "trainer.json"


RESTARTS = "fault/restarts"  # how many times torchrun restarted the workers (trainer.max_restarts)


RESUMES = "fault/resumes"  # how many times the run was continued from a checkpoint (restart or trainer.resume)


LOST_S = "fault/lost_s"  # wall time lost to faults: from the checkpoint resumed from to the resumed first step


CKPT_SAVE_S = "checkpoint/save_s"  # the mean seconds training waited per checkpoint (all ranks, synchronised)


CKPT_BYTES = "checkpoint/bytes"  # the size of the last checkpoint on disk, all ranks' shards together


CKPT_COUNT = "checkpoint/count"


@dataclass(frozen=True)
class Resumed:
    step: int  # the first step still to run
    lost_s: float  # wall time lost to faults so far, this resume's included (up to the load)
    resumes: int  # how many times the run was continued, this one included
    path: Path


RUN_ID_WAIT_S = 600.0  # how long a rank waits for run.py to open the run (a slow or remote store)


def job_run_id(cfg: DictConfig) -> str | None:
    """The MLflow run this job's checkpoints belong to: in the config when ``run.py`` knew it before starting
    the ranks (a resumed run), else the id it records in the job's status file once it has opened the run,
    which it does while the ranks start. Nodes other than node 0 open no run: None."""
    if cfg.runtime.get("run_id"):
        return str(cfg.runtime.run_id)
    if int(cfg.trainer.get("node_rank", 0)) != 0:
        return None
    found = status.run_id_of(Path(cfg.runtime.run_dir), RUN_ID_WAIT_S)
    if found is None:
        raise RuntimeError(f"run.py recorded no MLflow run id in {cfg.runtime.run_dir} within {RUN_ID_WAIT_S:.0f} s")
    return found


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _run_of(path: Path) -> str | None:
    try:
        return json.loads((path / META).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def complete(run_dir: Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``run_dir`` (of MLflow run ``run_id`` only, when
    given: a folder reused by another run never hands it its checkpoints), oldest first."""
    base = folder(run_dir)
    found = []
    for d in base.glob("step_*") if base.is_dir() else []:
        if (d / META).is_file() and d.name[5:].isdigit() and (run_id is None or _run_of(d) == run_id):
            found.append((int(d.name[5:]), d))
    return sorted(found)


def latest(run_dir: Path, run_id: str | None = None) -> tuple[int, Path] | None:
    found = complete(run_dir, run_id)
    return found[-1] if found else None


def _options(loading: bool = False) -> Any:
    """What a checkpoint holds: the parameters that train and the optimizer's state. Frozen parameters (a
    LoRA or QLoRA run's base) are left out: the resumed run rebuilds them as the first attempt did (the same
    seed, ``trainer.init_from``, NF4 quantization), and an NF4 base has no state dict DCP can load back. On
    loading, the model's frozen parameters are then absent from the state (``strict=False``); ``dcp.load``
    has already refused a checkpoint that lacks any parameter that trains."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd}


def _as_boxes(tree: Any) -> Any:
    """``tree`` with every DTensor DCP cannot write as it is laid out redistributed to one it can. DCP writes each
    rank's part as one box of the whole tensor; a weight split part by part (GPT-2's packed c_attn under tensor
    parallel, DTensor's ``_StridedShard`` on a dim no later mesh dim splits) holds several. Such a tensor is written
    split plainly on that dim instead: the same whole tensor, so a checkpoint loads under any layout. (FSDP's own
    ``_StridedShard``, over a dim tensor parallel splits after it, leaves each rank one box.)"""
    if isinstance(tree, dict):
        return {k: _as_boxes(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_as_boxes(v) for v in tree]
    placements = getattr(tree, "placements", None)
    plain = _plain_placements(placements) if placements is not None else None
    return tree if plain is None else tree.redistribute(placements=plain)


def _plain_placements(placements: Any) -> list[Any] | None:
    """``placements`` with each part-by-part split (a ``_StridedShard`` no later placement splits the dim of) made a
    plain one; None when there is none."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = list(placements)
    for i, p in enumerate(placements):
        if isinstance(p, _StridedShard) and all(getattr(q, "dim", None) != p.dim for q in placements[i + 1:]):
            out[i] = Shard(p.dim)
    return out if out != list(placements) else None


def _from_boxes(tree: Any, boxes: Any) -> Any:
    """``tree`` with what :func:`_as_boxes` redistributed (and DCP has loaded into) laid out as ``tree`` lays it."""
    if isinstance(tree, dict):
        return {k: _from_boxes(v, boxes[k]) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_from_boxes(v, b) for v, b in zip(tree, boxes, strict=True)]
    placements = getattr(tree, "placements", None)
    if placements is None or _plain_placements(placements) is None:
        return boxes  # loaded in place (a tensor) or as read (DCP replaces what is not a tensor)
    return boxes.redistribute(placements=placements)


class Checkpointer:
    """Saves the training state every ``trainer.checkpoint_interval`` steps (each call a collective: every
    rank makes it), keeping the last ``trainer.checkpoint_keep``.

    With ``trainer.checkpoint_async``, ``dcp.async_save`` copies the state and returns; the files are
    written in the background, through a process group of their own (training's collectives never share
    one with them), and the checkpoint is made complete (``trainer.json``) at the next save or at
    :meth:`finish`. ``checkpoint/save_s`` is what training waited for: the whole save, or the copy.
    """

    def __init__(self, cfg: DictConfig, env: DistEnv, resumed: Resumed | None = None):
        self.cfg, self.env, self.resumed = cfg, env, resumed
        self.run_dir, self.run_id = Path(cfg.runtime.run_dir), job_run_id(cfg)
        self.asynchronous = bool(cfg.trainer.get("checkpoint_async", False))
        self.waits: list[float] = []
        self.last_bytes = 0
        self._pending: tuple[Any, int, Path, float, Any] | None = None  # future, step, folder, time, scaler
        self._group = None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, next_step: int) -> None:
        """Save the state before step ``next_step``."""
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.finish()  # one save in flight at a time
        path = folder(self.run_dir) / f"step_{next_step}"
        t0, saved_at = time.perf_counter(), time.time()
        if self.env.is_main and path.exists():  # a partial save of this step from an attempt that died
            shutil.rmtree(path)
        _barrier(self.env)
        scaler_state = scaler.state_dict() if scaler is not None else None
        path.mkdir(parents=True, exist_ok=True)
        torch.save(torch.get_rng_state(), path / f"rng.rank{self.env.rank}.pt")
        if self.asynchronous:
            if self._group is None and dist.is_initialized():
                self._group = dist.new_group(backend="gloo")
            future = dcp.async_save(_as_boxes(_states(model, optimizer)), checkpoint_id=str(path),
                                    process_group=self._group)
            self._pending = (future, next_step, path, saved_at, scaler_state)
            self.waits.append(time.perf_counter() - t0)
        else:
            dcp.save(_as_boxes(_states(model, optimizer)), checkpoint_id=str(path))
            self._pending = (None, next_step, path, saved_at, scaler_state)
            self.finish()
            self.waits.append(time.perf_counter() - t0)

    def finish(self) -> None:
        """Wait for the save in flight, then make it complete (``trainer.json``) and drop old ones."""
        if self._pending is None:
            return
        future, step, path, saved_at, scaler_state = self._pending
        self._pending = None
        if future is not None:
            future.result()
        _barrier(self.env)
        if self.env.is_main:
            meta = {"step": step, "saved_at": saved_at, "run_id": self.run_id, "scaler": scaler_state,
                    "lost_s": self.resumed.lost_s if self.resumed else 0.0,
                    "resumes": self.resumed.resumes if self.resumed else 0}
            write_whole(path / META, json.dumps(meta))
            for _, old in complete(self.run_dir, self.run_id)[: -int(self.cfg.trainer.checkpoint_keep)]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.env)
        self.last_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    def metrics(self) -> dict[str, float]:
        if not self.waits:
            return {}
        mean = sum(self.waits) / len(self.waits)
        return {CKPT_SAVE_S: mean, CKPT_BYTES: self.last_bytes, CKPT_COUNT: len(self.waits)}


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, cfg: DictConfig,
         env: DistEnv) -> Resumed | None:
    """Load the latest complete checkpoint of ``run_dir`` into the freshly parallelised model and
    optimizer (a collective); None when there is none. With ``trainer.resume``, the time lost is counted
    up to the moment the continued run ended (``runtime.ended_at``), not up to now."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    found = latest(cfg.runtime.run_dir, job_run_id(cfg))
    if found is None:
        return None
    step, path = found
    ended_at = cfg.runtime.get("ended_at")
    states = _states(model, optimizer)
    boxes = _as_boxes(states)
    dcp.load(boxes, checkpoint_id=str(path))
    states = _from_boxes(states, boxes)
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optim"],
                   options=_options(loading=True))
    meta = json.loads((path / META).read_text())
    rng = path / f"rng.rank{env.rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    lost = float(meta.get("lost_s", 0.0)) + max(0.0, (ended_at or time.time()) - float(meta["saved_at"]))
    return Resumed(step=int(meta["step"]), lost_s=lost, resumes=int(meta.get("resumes", 0)) + 1, path=path)


def _barrier(env: DistEnv) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and env.world_size > 1:
        dist.barrier()


def stop_agreed(requested: bool, env: DistEnv) -> bool:
    """Whether any rank got a stop signal (a collective, so every rank stops at the same step)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and env.world_size > 1):
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
