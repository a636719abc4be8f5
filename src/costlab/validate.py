"""Refuse a config before any worker starts, with one line naming the key, the value and why.

Runs in the launcher, so it must stay light: no torch import, no CUDA initialisation. GPU facts
come from ``nvidia-smi``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import DictConfig

from costlab.errors import ConfigError, non_negative_int, positive_float, positive_int
from costlab.hardware import require_gpu, visible_gpus
from costlab.validate_compression import check_compression


def validate(cfg: DictConfig) -> None:
    """Every check that needs only the config and the machine, in the order a user reads the config."""
    t = cfg.trainer
    for key in ("batch_size", "grad_accum_steps", "nproc_per_node", "nnodes", "eval_batches",
                "eval_batch_size", "infer_batch_size", "infer_iters"):
        positive_int(cfg, f"trainer.{key}")
    if non_negative_int(cfg, "trainer.max_steps") == 0 and not t.get("init_from"):
        raise ConfigError("trainer.max_steps", 0, "0 is allowed only with trainer.init_from=<model file or run id>")
    for key in ("seed", "warmup_steps", "eval_interval", "timing_warmup_steps"):
        non_negative_int(cfg, f"trainer.{key}")
    positive_float(cfg, "trainer.lr")
    if t.grad_clip is not None and not (isinstance(t.grad_clip, (int, float)) and t.grad_clip > 0):
        raise ConfigError("trainer.grad_clip", t.grad_clip, "must be a positive number or null")
    if t.nnodes > 1 and not t.rdzv_endpoint:
        raise ConfigError("trainer.nnodes", t.nnodes, "several nodes need trainer.rdzv_endpoint=HOST:PORT")

    world = t.nnodes * t.nproc_per_node
    _check_model(cfg)
    _check_parallelism(cfg, world)  # the mesh must fit the world before the batch is cut along it
    dp = data_parallel_size(cfg, world)
    micro = dp * t.grad_accum_steps
    if t.batch_size % micro:
        raise ConfigError(
            "trainer.batch_size", t.batch_size,
            f"must be divisible by data-parallel ranks x grad_accum_steps = {dp} x {t.grad_accum_steps}",
        )
    _check_data(cfg)
    _check_precision(cfg)
    check_compression(cfg)


def data_parallel_size(cfg: DictConfig, world: int) -> int:
    p = cfg.parallelism
    return world // int(p.get("tp_degree", 1) or 1) // int(p.get("pp_degree", 1) or 1)


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    for key in [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "context", "hidden") if k in m]:
        positive_int(cfg, f"model.{key}")
    if "n_head" in m and m.n_embd % m.n_head:
        raise ConfigError("model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
    if m.get("pos") == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError("model.pos", m.pos, f"rotary positions need an even head size, got {m.n_embd // m.n_head}")
    for key, allowed in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope")), ("mlp", ("gelu", "swiglu"))):
        if key in m and m[key] not in allowed:
            raise ConfigError(f"model.{key}", m[key], f"choose one of {', '.join(allowed)}")
    if m.vocab_size < 256:
        raise ConfigError("model.vocab_size", m.vocab_size, "byte-level data needs at least 256")


def _check_data(cfg: DictConfig) -> None:
    from costlab.files import is_text

    d = cfg.data
    if d.name == "textfile":
        path = Path(str(d.path)).expanduser()
        if not path.exists():
            raise ConfigError("data.path", d.path, "no such file or folder")
        if path.is_file():
            if path.stat().st_size == 0:
                raise ConfigError("data.path", d.path, "the file is empty")
            if not is_text(path):
                raise ConfigError("data.path", d.path, "not a UTF-8 text file")
        else:
            files = [p for p in path.rglob("*") if p.is_file()]
            if not files:
                raise ConfigError("data.path", d.path, "the folder holds no files")
            if not any(is_text(f) for f in files):
                raise ConfigError("data.path", d.path, "the folder holds no UTF-8 text files")
    if d.name == "synthetic":
        positive_int(cfg, "data.n_bytes")
        if not 2 <= d.alphabet <= 256:
            raise ConfigError("data.alphabet", d.alphabet, "must be between 2 and 256")


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
AC_MODES = ("none", "full", "selective")


def _mlp_width(m: DictConfig) -> int:
    """The GPT MLP's hidden width, as ``costlab.model.GPTConfig.hidden_dim`` computes it."""
    hidden = int(m.get("mlp_ratio", 4.0) * m.n_embd)
    return 2 * hidden // 3 if m.get("mlp", "gelu") == "swiglu" else hidden


def _check_parallelism(cfg: DictConfig, world: int) -> None:
    p, t, m = cfg.parallelism, cfg.trainer, cfg.model
    n = t.nproc_per_node
    if p.name == "single" and world != 1:
        raise ConfigError("trainer.nproc_per_node", n, "parallelism=single runs one process; use parallelism=ddp")
    if cfg.trainer.device == "cuda":
        gpus = len(visible_gpus())
        if n > gpus:
            raise ConfigError("trainer.nproc_per_node", n, f"only {gpus} GPU(s) visible; one process per GPU")
    if non_negative_int(cfg, "trainer.node_rank") >= t.nnodes:
        raise ConfigError("trainer.node_rank", t.node_rank, f"must be below trainer.nnodes={t.nnodes} (0-based)")
    has_blocks = "n_head" in m  # the GPT family; model=mlp has no transformer blocks
    if p.name in ("tp", "pp", "fsdp_tp"):
        if world < 2:
            raise ConfigError(
                "parallelism", p.name, f"splits the model over ranks and needs at least 2; this run has {world} "
                "(set trainer.nproc_per_node=2)",
            )
        if not has_blocks:
            raise ConfigError("parallelism", p.name, f"splits transformer blocks; model={m.name} has none")
    if p.name == "tp":
        tp = positive_int(cfg, "parallelism.tp_degree")
        if tp != world:
            raise ConfigError(
                "parallelism.tp_degree", tp, f"must equal the world size {world} (trainer.nnodes x "
                "trainer.nproc_per_node); parallelism=fsdp_tp combines tensor parallel with data parallel",
            )
        _check_tp_degree(cfg, tp)
    if p.name == "fsdp_tp":
        dp, tp = positive_int(cfg, "parallelism.dp_shard"), positive_int(cfg, "parallelism.tp_degree")
        if dp * tp != world:
            raise ConfigError(
                "parallelism.dp_shard", dp,
                f"the mesh dp_shard x tp_degree = {dp} x {tp} = {dp * tp} must equal the world size {world}",
            )
        _check_tp_degree(cfg, tp)
    if p.name == "pp":
        _check_pipeline(cfg, world)
    mode = t.get("activation_checkpointing", "none")
    if mode not in AC_MODES:
        raise ConfigError("trainer.activation_checkpointing", mode, f"choose one of {', '.join(AC_MODES)}")
    if mode != "none" and not has_blocks:
        raise ConfigError(
            "trainer.activation_checkpointing", mode, f"checkpoints transformer blocks; model={m.name} has none"
        )
    if not isinstance(t.get("compile", False), bool):
        raise ConfigError("trainer.compile", t.compile, "must be true or false")


def _check_tp_degree(cfg: DictConfig, tp: int) -> None:
    """Tensor parallel splits whole heads, MLP units, vocabulary rows and position rows over ranks."""
    m = cfg.model
    width = _mlp_width(m)
    splits = [
        (m.n_head, f"model.n_head={m.n_head} (each rank takes whole heads)"),
        (width, f"the MLP width {width} (model.mlp_ratio x model.n_embd)"),
        (m.vocab_size, f"model.vocab_size={m.vocab_size} (the embedding is split by rows)"),
    ]
    if m.get("pos", "learned") == "learned":
        splits.append((m.block_size, f"model.block_size={m.block_size} (position embedding rows)"))
    for size, what in splits:
        if size % tp:
            raise ConfigError("parallelism.tp_degree", tp, f"must divide {what}")


def _check_pipeline(cfg: DictConfig, world: int) -> None:
    p, t, m = cfg.parallelism, cfg.trainer, cfg.model
    pp = positive_int(cfg, "parallelism.pp_degree")
    if pp != world:
        raise ConfigError(
            "parallelism.pp_degree", pp,
            f"must equal the world size {world} (trainer.nnodes x trainer.nproc_per_node): every rank is a stage",
        )
    if p.schedule not in PP_SCHEDULES:
        raise ConfigError("parallelism.schedule", p.schedule, f"choose one of {', '.join(PP_SCHEDULES)}")
    micro = positive_int(cfg, "parallelism.microbatches")
    per_rank = positive_int(cfg, "parallelism.stages_per_rank") if p.schedule == "interleaved_1f1b" else 1
    stages = pp * per_rank
    if m.n_layer % stages:
        raise ConfigError(
            "model.n_layer", m.n_layer, f"must split evenly into {stages} pipeline stages "
            f"(parallelism.pp_degree={pp} x stages_per_rank={per_rank})",
        )
    rows = t.batch_size // t.grad_accum_steps
    if rows % micro:
        raise ConfigError(
            "parallelism.microbatches", micro,
            f"must divide the sequences of each step, trainer.batch_size / grad_accum_steps = {rows}",
        )
    if p.schedule != "gpipe" and micro < pp:
        raise ConfigError(
            "parallelism.microbatches", micro, f"{p.schedule} needs at least pp_degree={pp} micro-batches"
        )
    if p.schedule == "interleaved_1f1b" and micro % max(1, micro // pp):
        raise ConfigError("parallelism.microbatches", micro, f"interleaved_1f1b needs a multiple of pp_degree={pp}")


def _check_precision(cfg: DictConfig) -> None:
    pr, p, m = cfg.precision, cfg.parallelism, cfg.model
    if pr.name == "fp8":
        require_gpu("precision", "fp8", cfg, (8, 9), "torchao float8 training")
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("precision", "fp8", "needs torchao: pip install 'costlab[quant]'")
        if "n_head" not in m:
            raise ConfigError(
                "precision", "fp8", f"converts the Linear layers of transformer blocks; model={m.name} has none"
            )
        tp = int(p.get("tp_degree", 1) or 1) if p.name in ("tp", "fsdp_tp") else 1
        for what, width in (("model.n_embd", m.n_embd), ("the MLP width", _mlp_width(m))):
            if (width // tp) % 16:
                raise ConfigError("precision", "fp8", f"float8 matmuls need widths divisible by 16 per rank; {what} "
                                  f"is {width} over {tp} rank(s)")
    if pr.get("grad_scaler", False) and p.name == "pp":
        raise ConfigError(
            "precision", pr.name, "parallelism=pp cannot use fp16's GradScaler: each stage would skip overflowing "
            "steps on its own and the stages would drift apart; use precision=bf16",
        )
