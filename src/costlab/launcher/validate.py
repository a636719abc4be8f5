"""Refuse a config before any worker starts, with one line naming the key, the value and why.

Runs in the launcher: shapes come from the model built on the meta device (torch is imported only
when a check needs them) and CUDA is never initialised; GPU facts come from ``nvidia-smi``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from costlab import precision
from costlab.launcher.validate_compression import check_compression
from costlab.measure.machine import visible_gpus
from costlab.models.adapters import holds_nf4, uses_adapters
from costlab.models.hf_config import (
    PIPELINE_FAMILIES,
    TP_LAYER_PLANS,
    config_file,
    is_hf,
    layer_count,
    read_config,
    shipped_configs,
    tokenizer_folder,
)
from costlab.models.saved import expected_shapes
from costlab.parallelism.dims import DEGREE_KEYS, ParallelDims, parallel_dims
from costlab.pruning import build_pruning
from costlab.quantization import build_quantization
from costlab.schema import ConfigError, check_config, option


def validate(cfg: DictConfig) -> None:
    """Every check that needs only the config and the machine, in the order a user reads the config."""
    check_config(cfg)  # every key's type and range (costlab.schema); what follows relates keys to each other
    t = cfg.trainer
    if t.max_steps == 0 and not t.get("init_from"):
        raise ConfigError("trainer.max_steps", 0, "0 is allowed only with trainer.init_from=<model file or run id>")
    _check_checkpointing(cfg)
    if t.nnodes > 1 and not t.rdzv_endpoint and cfg.get("mode", "train") != "plan":  # a plan launches nothing
        raise ConfigError("trainer.nnodes", t.nnodes, "several nodes need trainer.rdzv_endpoint=HOST:PORT")

    if cfg.get("mode", "train") != "plan" and cfg.get("plan", {}).get("search"):  # else it would train instead
        raise ConfigError("plan.search", "true", "searches layouts only in a plan: add mode=plan")
    _check_search_space(cfg)

    world = t.nnodes * t.nproc_per_node
    _check_model(cfg)
    if cfg.get("mode") == "plan" and cfg.plan.get("search"):  # the search checks each layout it tries, whole
        _check_data(cfg)
        _check_optimizer(cfg)
        return
    linears = _Linears(cfg.model)
    dims = _check_parallelism(cfg, world, linears)  # the mesh must fit the world before the batch is cut along it
    micro = dims.dp * t.grad_accum_steps
    if t.batch_size % micro:
        raise ConfigError(
            "trainer.batch_size", t.batch_size,
            f"must be divisible by data-parallel ranks x grad_accum_steps = {dims.dp} x {t.grad_accum_steps}",
        )
    if dims.pp_enabled:
        _check_pipeline(cfg, dims)
    _check_data(cfg)
    if "serve" in cfg:  # configs written before serving was measured have none
        _check_serve(cfg)
    _check_optimizer(cfg)
    _check_finetune(cfg, dims)

    def block_widths() -> tuple[int, int] | None:  # read from the model's shapes only when fp8 asks
        return (cfg.model.n_embd, _mlp_width(linears)) if _has_blocks(linears) and not is_hf(cfg) else None

    precision.check(cfg, dims.tp, dims.pp_enabled, block_widths, is_hf(cfg))
    check_compression(cfg)


def card_precisions(cfg: DictConfig) -> list[str]:
    """The precision options a layout search tries on ``cfg``'s card: bf16, and fp8 where its option has an fp8
    peak; a CPU's fp32 and bf16."""
    if cfg.hardware.name == "cpu":
        return ["fp32", "bf16"]
    return ["bf16"] + (["fp8"] if (cfg.hardware.get("peak_tflops") or {}).get("fp8") else [])


def _check_search_space(cfg: DictConfig) -> None:
    """``plan.precisions`` and ``plan.checkpointing`` narrow a search: they need one, must name something, and a
    precision must be one the search can try on the card."""
    plan = cfg.get("plan") or {}
    for name in ("precisions", "checkpointing"):
        chosen = plan.get(name)
        if chosen is None:
            continue
        value = list(chosen)
        if not (cfg.get("mode") == "plan" and plan.get("search")):
            raise ConfigError(f"plan.{name}", value, "narrows a layout search only: add mode=plan plan.search=true")
        if not value:
            raise ConfigError(f"plan.{name}", value, "must name at least one (null: every one)")
    if plan.get("precisions") is not None:
        card = card_precisions(cfg)
        off = [p for p in plan.precisions if p not in card]
        if off:
            raise ConfigError("plan.precisions", list(plan.precisions), f"hardware={cfg.hardware.name} is searched "
                              f"in {', '.join(card)} only ({off[0]} is not one)")


def _check_checkpointing(cfg: DictConfig) -> None:
    """Train-time compression changes the model as a function of its own history (masks that only grow,
    fake quantization switched on at a step): a checkpoint does not hold that history, so it is refused."""
    t = cfg.trainer
    if not (t.checkpoint_interval or t.max_restarts or t.get("resume")):
        return
    key = next((k for k in ("checkpoint_interval", "max_restarts", "resume") if t.get(k)), "checkpoint_interval")
    for group, lever in (("pruning", build_pruning(cfg)), ("quantization", build_quantization(cfg))):
        if lever.acts_during_training:
            raise ConfigError(f"trainer.{key}", t[key], f"cannot resume {group}={lever.name}: it acts during "
                              "training, and a checkpoint does not hold what it did (its masks or fake quantization)")


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    if is_hf(cfg):
        _check_hf(cfg)
        return
    if "n_head" in m and m.n_embd % m.n_head:
        raise ConfigError("model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
    if m.get("pos") == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError("model.pos", m.pos, f"rotary positions need an even head size, got {m.n_embd // m.n_head}")


def _check_hf(cfg: DictConfig) -> None:
    """``model=hf``: transformers installed, a config or folder that exists, bytes in the vocabulary, the
    sequence length within the positions, and only the levers built for these models."""
    m = cfg.model
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("model", "hf", "needs Hugging Face transformers: pip install 'costlab[hf]'")
    source = m.get("pretrained")
    if source:
        path = Path(str(source)).expanduser()
        hub_id = not path.exists() and not str(source).startswith((".", "/", "~")) and str(source).count("/") <= 1
        if hub_id:  # fetched by transformers in the worker, where the machine is online
            return _check_hf_levers(cfg, None)
        if not (path / "config.json").is_file():
            raise ConfigError("model.pretrained", source, "no config.json there: give a folder written by "
                              "save_pretrained (or a hub id where the machine is online)")
    else:
        if not m.get("config"):
            raise ConfigError("model.config", m.get("config"), "model=hf needs model.pretrained=<folder> or "
                              f"model.config=<{'|'.join(shipped_configs())} or a config.json>")
        if not config_file(str(m.config)).is_file():
            raise ConfigError("model.config", m.config, f"no such config: give one of {', '.join(shipped_configs())} "
                              "or a config.json (or a folder holding one)")
    try:
        hf_config = read_config(m)
    except ValueError as e:
        raise ConfigError("model.pretrained" if source else "model.config", source or m.config,
                          f"config.json is not valid JSON ({e})") from None
    _check_hf_levers(cfg, hf_config)


def _check_hf_levers(cfg: DictConfig, hf_config: dict | None) -> None:
    m = cfg.model
    key = "model.pretrained" if m.get("pretrained") else "model.config"
    value = m.get("pretrained") or m.get("config")
    if hf_config is not None:
        vocab = hf_config.get("vocab_size") or 0
        folder = tokenizer_folder(m)
        if folder is None and vocab < 256:
            raise ConfigError(key, value, f"vocab_size={vocab}: byte-level data needs at least 256 (the folder has "
                              "no tokenizer)")
        if folder is not None and (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer  # what transformers' fast tokenizers are made of: no torch

            size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
            if size > vocab:
                raise ConfigError(key, value, f"its tokenizer has {size} tokens, more than the model's "
                                  f"vocab_size={vocab}")
        positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
        if positions and m.block_size > positions:
            raise ConfigError("model.block_size", m.block_size, f"the model has {positions} positions "
                              f"(max_position_embeddings of {value})")


def _check_optimizer(cfg: DictConfig) -> None:
    """What the optimizer option checks beyond its keys' types (its package installed, Nesterov's terms)."""
    option("optimizer", cfg.optimizer).check()


def _check_finetune(cfg: DictConfig, dims: ParallelDims) -> None:
    """LoRA's adapters replace the targeted Linear layers while training: what lays those layers out by name
    (tensor-parallel plans, float8 swaps) or changes them as it trains is refused. Pipeline stages keep whole
    blocks, adapters and all."""
    o = option("finetune", cfg.finetune)
    o.check()
    if not uses_adapters(cfg):
        return
    layouts = "; use parallelism=single, ddp, fsdp, hsdp or pp"
    if dims.fsdp_enabled and holds_nf4(cfg) and cfg.finetune.get("backend") == "bitsandbytes":
        raise ConfigError("finetune.backend", "bitsandbytes", "FSDP2 cannot shard bitsandbytes' packed 4-bit weights; "
                          "use finetune.backend=torchao (or auto) with parallelism=fsdp")
    if dims.tp_enabled:
        why = "tensor parallel shards the targeted Linear layers by name, and the adapters take their place" + layouts
    elif precision.trains_in_float8(cfg):
        why = "float8 training swaps the Linear layers the adapters wrap; use precision=bf16"
    else:
        acting = [f"{g}={lever.name}" for g, lever in (("pruning", build_pruning(cfg)),
                                                       ("quantization", build_quantization(cfg)))
                  if lever.acts_during_training]
        why = f"{acting[0]} acts on the weights while training, and only the adapters train" if acting else None
    if why:
        raise ConfigError("finetune", o.name, why)
    if not bool(cfg.finetune.get("merge", True)):  # the adapter ships alone
        if not (cfg.trainer.get("init_from") or cfg.model.get("pretrained")):
            raise ConfigError("finetune.merge", False, "an adapter shipped alone needs the base it was trained on: "
                              "give trainer.init_from=<run id, run folder or model file> or model.pretrained=<folder>")
        compressing = [f"{g}={cfg[g].name}" for g in ("pruning", "quantization")
                       if cfg[g].get("name", "none") != "none"]
        if compressing:
            raise ConfigError("finetune.merge", False, f"{compressing[0]} compresses a dense model, and an adapter "
                              "shipped alone is not one; use finetune.merge=true to compress the merged model")


def resolve_nf4_backend(cfg: DictConfig) -> None:
    """``finetune=qlora backend=auto``: the NF4 backend the run uses, in ``cfg`` before any rank starts.
    Under FSDP torchao's (FSDP2 shards its ``NF4Tensor``; bitsandbytes' packed weights it cannot); on a GPU
    bitsandbytes' when installed (its CUDA kernels are QLoRA's own; the launcher never touches the GPU to time
    them); on a CPU the faster of those installed, timed here (``finetune.probe_ms``). A plan is for the card its
    ``hardware`` names, not for this machine: a GPU's choice there; a plan search leaves ``auto`` (torchao's bytes)
    to its layouts, as FSDP's would be."""
    if not holds_nf4(cfg) or cfg.finetune.get("backend", "auto") != "auto":
        return
    planning = cfg.get("mode", "train") == "plan"
    if planning and cfg.plan.get("search"):
        return
    dims = parallel_dims(cfg.parallelism, cfg.trainer.nnodes * cfg.trainer.nproc_per_node)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if dims.fsdp_enabled or not has_bnb:
        cfg.finetune.backend = "torchao"
    elif cfg.trainer.device == "cuda" or (planning and cfg.hardware.name != "cpu"):
        cfg.finetune.backend = "bitsandbytes"
    else:
        from costlab.measure.probes import choose_nf4_backend

        cfg.finetune.backend, cfg.finetune.probe_ms = choose_nf4_backend(("torchao", "bitsandbytes"))


def finetune_warnings(cfg: DictConfig) -> list[str]:
    """LoRA from random weights trains, but is rarely what was meant."""
    if not uses_adapters(cfg):
        return []
    if cfg.trainer.get("init_from") or cfg.model.get("pretrained") or cfg.trainer.get("resume"):
        return []
    return [f"finetune={cfg.finetune.name} starts from random weights: only the adapters train; give "
            "trainer.init_from=<run id, run folder or model file> (or model.pretrained=<folder> for model=hf) "
            "to fine-tune a trained model"]


def _check_serve(cfg: DictConfig) -> None:
    option("serve", cfg.serve).check()
    kv = cfg.serve.kv_cache_dtype
    if not (cfg.serve.enabled and is_hf(cfg)) or kv == "auto":
        return
    if kv != "fp8":
        raise ConfigError("serve.kv_cache_dtype", kv, "model=hf serves with transformers' caches: auto "
                          "(DynamicCache) or fp8 (QuantizedCache); its int8 backend needs the hqq package")
    try:
        hf = read_config(cfg.model)
    except (OSError, ValueError):  # a hub id, or a config the model checks refuse in their own words
        return
    local = hf.get("sliding_window") is not None and hf.get("use_sliding_window", True)
    if local or set(hf.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        raise ConfigError("serve.kv_cache_dtype", kv, "transformers' QuantizedCache takes models whose every "
                          "layer attends to the full sequence; this config has sliding-window layers")


def _check_data(cfg: DictConfig) -> None:
    """What the data option itself checks beyond its keys' types (a textfile's path holds text)."""
    option("data", cfg.data).check()




@functools.lru_cache(maxsize=8)
def _linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    """A ``model`` node's (YAML) Linear shapes, built once per process: a plan search checks many layouts of one."""
    return expected_shapes(OmegaConf.create(model))[1]


class _Linears(Mapping):
    """Linear layer name -> (out, in) of the configured model, read from the model built on the meta
    device on first use: a config whose checks need no shapes costs the launcher no torch import."""

    def __init__(self, model_cfg: DictConfig):
        self._model_cfg = model_cfg
        self._layers: dict[str, tuple[int, int]] | None = None

    def _get(self) -> dict[str, tuple[int, int]]:
        if self._layers is None:
            self._layers = _linear_shapes(OmegaConf.to_yaml(self._model_cfg, resolve=True))
        return self._layers

    def __getitem__(self, name: str) -> tuple[int, int]:
        return self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _has_blocks(linears: Mapping[str, tuple[int, int]]) -> bool:
    # the GPT family and model=hf (its decoder layers); model=mlp has no transformer blocks
    return "blocks.0.mlp.c_fc" in linears or any(n.startswith("hf.") for n in linears)


def _mlp_width(linears: Mapping[str, tuple[int, int]]) -> int:
    return linears["blocks.0.mlp.c_fc"][0]


def _check_parallelism(cfg: DictConfig, world: int, linears: Mapping[str, tuple[int, int]]) -> ParallelDims:
    p, t, m = cfg.parallelism, cfg.trainer, cfg.model
    n = t.nproc_per_node
    degrees = [p.get(k, 1) for k in DEGREE_KEYS]
    if all(d == 1 for d in degrees) and world != 1:
        raise ConfigError("trainer.nproc_per_node", n, f"parallelism={p.name} runs one process; use parallelism=ddp")
    if cfg.trainer.device == "cuda":
        gpus = len(visible_gpus())
        if n > gpus:
            raise ConfigError("trainer.nproc_per_node", n, f"only {gpus} GPU(s) visible; one process per GPU")
    if t.node_rank >= t.nnodes:
        raise ConfigError("trainer.node_rank", t.node_rank, f"must be below trainer.nnodes={t.nnodes} (0-based)")
    if p.get("tp_degree", 1) != 1 or p.get("pp_degree", 1) != 1:  # the model itself is split
        if world < 2:
            raise ConfigError(
                "parallelism", p.name, f"splits the model over ranks and needs at least 2; this run has {world} "
                "(set trainer.nproc_per_node=2)",
            )
        if not _has_blocks(linears):
            raise ConfigError("parallelism", p.name, f"splits transformer blocks; model={m.name} has none")
    dims = parallel_dims(p, world)
    if dims.ddp_enabled and (dims.tp_enabled or dims.pp_enabled):
        raise ConfigError("parallelism.dp_replicate", dims.dp_replicate, "DDP replicas combine with tensor or "
                          "pipeline parallel only through FSDP's (set parallelism.dp_shard > 1: HSDP), or use "
                          "dp_shard alone")
    if (dims.tp_enabled or dims.pp_enabled) and not _has_blocks(linears):
        raise ConfigError("parallelism", p.name, f"splits transformer blocks; model={m.name} has none")
    if dims.pp_enabled and is_hf(cfg):
        family = read_config(cfg.model).get("model_type")
        if family not in PIPELINE_FAMILIES:
            raise ConfigError("parallelism.pp_degree", dims.pp, f"pipeline parallel for model=hf cuts the "
                              f"{', '.join(PIPELINE_FAMILIES)} families into stages; this model's model_type is "
                              f"{family}")
    if dims.tp_enabled:
        if is_hf(cfg):
            _check_hf_tp_degree(cfg, dims.tp)
        else:
            _check_tp_degree(cfg, dims.tp, linears)
    if p.get("offload", "none") == "cpu":
        if not dims.fsdp_enabled:
            raise ConfigError("parallelism.offload", "cpu", "offloads FSDP2's shards; it needs sharding "
                              "(parallelism=fsdp or dp_shard > 1)")
        if t.device != "cuda":
            raise ConfigError("parallelism.offload", "cpu", "moves shards from GPU memory to host memory; on a CPU "
                              "run they are in host memory already, so it saves nothing (use trainer.device=cuda)")
    mode = t.activation_checkpointing
    if mode != "none" and not _has_blocks(linears):
        raise ConfigError(
            "trainer.activation_checkpointing", mode, f"checkpoints transformer blocks; model={m.name} has none"
        )
    return dims


def _check_hf_tp_degree(cfg: DictConfig, tp: int) -> None:
    """model=hf: the families of costlab.models.hf_config.TP_LAYER_PLANS, split into whole query heads, whole
    key/value heads and MLP units (the vocabulary's rows split unevenly where they must)."""
    hf = read_config(cfg.model)
    family = hf.get("model_type")
    if family not in TP_LAYER_PLANS:
        raise ConfigError("parallelism.tp_degree", tp, f"tensor parallel for model=hf splits the "
                          f"{', '.join(TP_LAYER_PLANS)} families' layers; this model's model_type is {family}")
    if family == "gpt2":  # GPT-2's names; its MLP is n_inner wide, 4 x n_embd where that is null
        sizes = [(hf["n_head"], "n_head"), (hf.get("n_inner") or 4 * hf["n_embd"], "n_inner")]
    else:
        heads = hf["num_attention_heads"]
        sizes = [(heads, "num_attention_heads"), (hf.get("num_key_value_heads") or heads, "num_key_value_heads")]
        if hf.get("intermediate_size"):
            sizes.append((hf["intermediate_size"], "intermediate_size"))
    for size, what in sizes:
        if size % tp:
            raise ConfigError("parallelism.tp_degree", tp, f"must divide the model's {what}={size}")


def _check_tp_degree(cfg: DictConfig, tp: int, linears: Mapping[str, tuple[int, int]]) -> None:
    """Tensor parallel splits whole heads and MLP units over ranks. The vocabulary's and the positions' rows need
    not divide: DTensor splits them unevenly (GPT-2's 50,257 tokens, the first ranks a row more)."""
    m = cfg.model
    width = _mlp_width(linears)
    splits = [
        (m.n_head, f"model.n_head={m.n_head} (each rank takes whole heads)"),
        (width, f"the MLP width {width} (model.mlp_ratio x model.n_embd, to a multiple of model.mlp_multiple_of)"),
    ]
    for size, what in splits:
        if size % tp:
            raise ConfigError("parallelism.tp_degree", tp, f"must divide {what}")


def _check_pipeline(cfg: DictConfig, dims: ParallelDims) -> None:
    p, t, m = cfg.parallelism, cfg.trainer, cfg.model
    pp = dims.pp
    missing = [k for k in ("schedule", "microbatches", "stages_per_rank") if k not in p]
    if missing:  # a pipeline degree set on another option, which has no pipeline keys
        raise ConfigError("parallelism.pp_degree", pp, f"pipeline stages need parallelism=pp's keys "
                          f"({', '.join(missing)}); parallelism={p.name} has none: use parallelism=pp "
                          f"parallelism.pp_degree={pp} and set the other degrees there")
    micro = p.microbatches
    per_rank = p.stages_per_rank if p.schedule == "interleaved_1f1b" else 1
    stages = pp * per_rank
    if is_hf(cfg):
        layers = layer_count(read_config(m))
        if layers % stages:
            raise ConfigError("parallelism.pp_degree", pp, f"the model's num_hidden_layers={layers} must split evenly "
                              f"into {stages} pipeline stages (pp_degree={pp} x stages_per_rank={per_rank})")
    elif m.n_layer % stages:
        raise ConfigError(
            "model.n_layer", m.n_layer, f"must split evenly into {stages} pipeline stages "
            f"(parallelism.pp_degree={pp} x stages_per_rank={per_rank})",
        )
    rows = t.batch_size // dims.dp // t.grad_accum_steps
    if rows % micro:
        raise ConfigError(
            "parallelism.microbatches", micro, "must divide the sequences of each step on each pipeline, "
            f"trainer.batch_size / data-parallel ranks / grad_accum_steps = {rows}",
        )
    if p.schedule != "gpipe" and micro < pp:
        raise ConfigError(
            "parallelism.microbatches", micro, f"{p.schedule} needs at least pp_degree={pp} micro-batches"
        )
    rounds = max(1, micro // pp)  # PyTorch's ScheduleInterleaved1F1B runs the micro-batches in rounds of ~pp_degree
    if p.schedule == "interleaved_1f1b" and micro % rounds:
        raise ConfigError("parallelism.microbatches", micro, f"interleaved_1f1b runs them in microbatches // "
                          f"pp_degree={pp} = {rounds} rounds of equal size, so it needs a multiple of {rounds} "
                          f"(a multiple of pp_degree={pp} always is)")
