"""The ``finetune`` group: which parameters train. ``full``: all of them; ``lora``: PEFT's LoRA adapters
injected into the targeted Linear layers of the model as it is (costlab's GPTs and Hugging Face models
alike: the module tree keeps its classes, so every layout's code finds its blocks), every other parameter
frozen; ``qlora``: the same adapters on a base whose adapted Linear weights are held in 4-bit NF4 (torchao's
``NF4Tensor`` or bitsandbytes' ``Linear4bit``). The shipped model has the adapters merged into its weights
(:func:`merge_adapters`; an NF4 base is dequantized first), so it is a plain model of the run's ``model``
config, which every compression option, ``costlab.use`` and a reload take as they take any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from costlab.schema import group_node

if TYPE_CHECKING:  # torch is imported by the ranks; the launcher asks uses_adapters() without it
    import torch
    from torch import nn

LORA = "costlab.models.adapters.lora"
QLORA = "costlab.models.adapters.qlora"
NF4_BLOCK = 64  # values per NF4 block (one absmax scale each), torchao's and bitsandbytes' default
NF4_SCALER_BLOCK = 256  # block scales per block of the second quantization (torchao's scaler_block_size)
BNB_CODE_VALUES = 256 + 16  # bitsandbytes keeps, per weight, the 8-bit map of its scales and the 16 NF4 values
TORCHAO_CODE_VALUES = 16 + 1  # torchao keeps, per weight, the 16 NF4 values and the mean of the block scales


def uses_adapters(cfg: DictConfig) -> bool:
    return group_node(cfg, "finetune").get("_target_") in (LORA, QLORA)


def holds_nf4(cfg: DictConfig) -> bool:
    """Whether the run's frozen base is held in NF4 (``finetune=qlora``)."""
    return group_node(cfg, "finetune").get("_target_") == QLORA


def nf4_backend(cfg: DictConfig) -> str:
    """The NF4 implementation a ``qlora`` run uses: ``finetune.backend`` as the launcher resolved it (``auto``
    becomes the faster one, :func:`costlab.measure.probes.choose_nf4_backend`); torchao where nothing resolved it."""
    backend = str(group_node(cfg, "finetune").get("backend", "torchao"))
    return "torchao" if backend == "auto" else backend


def nf4_scaler_block(numel: int, shards: int = 1) -> int | None:
    """torchao's second-level block for a weight of ``numel`` values split over ``shards`` FSDP ranks: the largest
    power of two up to ``NF4_SCALER_BLOCK`` dividing each shard's count of blocks (FSDP2 splits the scales
    with the codes); None when the weight does not split into whole blocks per shard (it stays in full
    precision)."""
    if numel % (NF4_BLOCK * shards):
        return None
    return math.gcd(numel // NF4_BLOCK // shards, NF4_SCALER_BLOCK)


def nf4_bytes(numel: int, backend: str, shards: int = 1) -> int | None:
    """Bytes one of ``shards`` ranks holds of an NF4 weight of ``numel`` values (codes, block scales, their
    scales, code tables), as :func:`costlab.measure.metrics.state_bytes_per_rank` counts them; None for a weight
    torchao leaves in full precision (:func:`nf4_scaler_block`)."""
    if backend == "bitsandbytes":  # packed codes, uint8 block scales, fp32 scales of those per 256, offset, maps
        blocks = math.ceil(numel / NF4_BLOCK)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (BNB_CODE_VALUES + 1)
    scaler = nf4_scaler_block(numel, shards)
    if scaler is None:
        return None
    blocks = numel // NF4_BLOCK // shards
    return numel // 2 // shards + blocks + 4 * (blocks // scaler) + 4 * TORCHAO_CODE_VALUES


def apply_finetune(model: nn.Module, cfg: DictConfig, quantize: bool = True, shards: int = 1) -> nn.Module:
    """``model`` as the ``finetune`` option trains it: the option's ``_target_`` called on it with the option's
    keys (:func:`full`, :func:`lora`, :func:`qlora`; an NF4 base cut for FSDP over ``shards`` ranks).
    ``quantize=False``: a ``qlora`` run's adapters on a plain base, to load a :func:`dense_state` into."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    node = group_node(cfg, "finetune")
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(node, dict)
    target = str(node["_target_"])
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "name", "backend", "probe_ms")}
    if target == QLORA and quantize:
        kwargs.update(backend=nf4_backend(cfg), shards=shards,
                      compute_dtype=cfg.precision.get("autocast_dtype") if "precision" in cfg else None)
    elif target == QLORA:
        target = LORA
    return get_object(target)(model, **kwargs)


def full(model: nn.Module) -> nn.Module:
    """Every parameter trains: the model as it is."""
    return model


def lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
         targets: Sequence[str] = (), merge: bool = True) -> nn.Module:
    """PEFT's LoRA adapters (``LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
    target_modules=targets)``) injected into ``model`` in place, every other parameter frozen. ``merge``: the
    shipped model has them merged (:func:`merge_adapters`, called where the shipped model is made)."""
    from peft import LoraConfig, inject_adapter_in_model  # optional: the finetune extra

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def qlora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] = (),
          merge: bool = True, backend: str = "torchao", compute_dtype: str | None = None, shards: int = 1,
          probe_ms: dict[str, float] | None = None) -> nn.Module:
    """:func:`lora`'s adapters, then each adapted Linear's frozen weight held in NF4 by ``backend`` (``torchao``:
    an ``NF4Tensor`` parameter, whose matmul dequantizes block by block, its blocks cut so that FSDP can split
    it over ``shards`` ranks; ``bitsandbytes``: a ``Linear4bit`` in its place, computing in ``compute_dtype``,
    fp32 when None). The adapters stay in the model's dtype. On the meta device (the memory model) nothing is
    quantized: :func:`nf4_bytes` counts what would be held. ``probe_ms``: the launcher's timing of the backends
    when it chose one (``backend=auto``), kept in the config as the record of the choice; not used here."""
    model = lora(model, rank, alpha, dropout, targets, merge)
    for layer in _lora_layers(model):
        base = layer.get_base_layer()
        if base.weight.is_meta:
            continue
        if backend == "bitsandbytes":
            layer.base_layer = _bnb_linear(base, compute_dtype)
        else:
            _torchao_nf4(base, shards)
    return model


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _torchao_nf4(linear: nn.Module, shards: int = 1) -> None:
    import torch
    from torchao.quantization import to_nf4

    scaler = nf4_scaler_block(linear.weight.numel(), shards)
    if scaler is not None:
        linear.weight = torch.nn.Parameter(to_nf4(linear.weight.detach(), NF4_BLOCK, scaler), requires_grad=False)


def _bnb_linear(linear: nn.Module, compute_dtype: str | None) -> nn.Module:
    import bitsandbytes as bnb
    import torch

    dtype = getattr(torch, compute_dtype) if compute_dtype else torch.float32
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=dtype, quant_type="nf4", compress_statistics=True, device="meta")
    device = linear.weight.device
    q.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu"), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=NF4_BLOCK).to(device)  # quantized here
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q


def is_nf4(t: object) -> bool:
    """Whether ``t`` is a weight held in NF4 (torchao's ``NF4Tensor``, bitsandbytes' ``Params4bit``)."""
    return type(t).__name__ in ("NF4Tensor", "Params4bit")


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The dense fp32 values an NF4 weight stands for."""
    import torch

    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    return weight.get_original_weight().to(torch.float32)


def _dense_base(layer: Any) -> None:
    """Put a plain fp32 Linear holding the dequantized weight under an adapter whose base is held in NF4."""
    import torch

    base = layer.get_base_layer()
    if not is_nf4(base.weight):
        return
    dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                            device=base.weight.device)
    with torch.no_grad():
        dense.weight.copy_(dequantized(base.weight))
        if base.bias is not None:
            dense.bias.copy_(base.bias.to(torch.float32))
    layer.base_layer = dense


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter into its base layer and put the base layer back in its place (in place, as
    PEFT's ``merge_and_unload`` does for a ``PeftModel``; an NF4 base is dequantized to fp32 first); the model's
    parameters train again, as a loaded model's do. A model without adapters is returned as it is."""
    from peft.tuners.lora import LoraLayer

    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in adapted:
        _dense_base(module)
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if adapted:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def dense_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a model's state dict) with every NF4 weight replaced by the dense fp32 values it stands for:
    torchao's ``NF4Tensor`` entries, and bitsandbytes' packed weights with the quantization state it saves beside
    them (``<weight>.absmax``, ``<weight>.quant_state.bitsandbytes__nf4``, ...)."""
    marker = ".quant_state.bitsandbytes__nf4"
    packed = {k.removesuffix(marker) for k in state if k.endswith(marker)}
    out: dict[str, Any] = {}
    for k, v in state.items():
        if any(k.startswith(w + ".") for w in packed):
            continue  # a packed weight's quantization state: used below
        if k in packed:
            import bitsandbytes.functional as bnbf
            import torch

            saved = {n.removeprefix(k + "."): x for n, x in state.items() if n.startswith(k + ".")}
            quant = bnbf.QuantState.from_dict(saved, device=v.device)
            out[k] = bnbf.dequantize_4bit(v.data, quant).to(torch.float32)
        elif is_nf4(v):
            out[k] = dequantized(v)
        else:
            out[k] = v
    return out


ADAPTER_DIR = "adapter"  # in the run folder: the adapter shipped alone (finetune.merge=false), PEFT's format
ADAPTER_TAG = "costlab.adapter"  # MLflow tag: that folder
WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing's and compile's, in names


def ships_adapter(cfg: DictConfig) -> bool:
    """Whether the run ships its adapter alone beside the merged model (``finetune.merge=false``)."""
    return uses_adapters(cfg) and not bool(group_node(cfg, "finetune").get("merge", True))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapters' weights, whole, by their names in the plain model (``blocks.0.attn.c_q.lora_A.
    default.weight``; DDP's, checkpointing's and compile's wrappers taken out of the names). A collective where
    the adapters are sharded (FSDP's DTensors are gathered): every rank calls it."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            continue
        name = name.removeprefix("module.")  # DDP's
        for wrapper in WRAPPERS:
            name = name.replace(wrapper, "")
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
    return out


def save_adapter(state: dict[str, torch.Tensor], cfg: DictConfig, folder: Path) -> int:
    """Write the adapter in PEFT's format, as ``PeftModel.save_pretrained`` does (``adapter_model.safetensors``,
    keys ``base_model.model.<module>.lora_A.weight``; ``adapter_config.json``, the ``LoraConfig`` with the base it
    was trained on), so ``PeftModel.from_pretrained`` puts it on that base (a Hugging Face model's names are
    those of the ``transformers`` model costlab wraps). Returns the bytes written."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    node = group_node(cfg, "finetune")
    hf = str(group_node(cfg, "model").get("_target_", "")).startswith("costlab.models.hf.")
    tensors = {}
    for name, t in state.items():
        name = name.replace(".default.", ".")
        tensors["base_model.model." + (name.removeprefix("hf.") if hf else name)] = t.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    base = cfg.model.get("pretrained") or cfg.get("runtime", {}).get("init_from")
    LoraConfig(r=int(node.rank), lora_alpha=float(node.alpha), lora_dropout=float(node.dropout), bias="none",
               target_modules=list(node.targets), base_model_name_or_path=str(base) if base else None,
               ).save_pretrained(str(folder))
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def load_adapter(model: nn.Module, folder: Path, merge: bool = True) -> nn.Module:
    """Put an adapter saved by :func:`save_adapter` on ``model`` (the base it was trained on, a plain model of
    the run's config), merged into its weights unless ``merge=False``."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(folder))
    model = inject_adapter_in_model(config, model)
    hf = hasattr(model, "hf")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    state = {("hf." if hf else "") + k.removeprefix("base_model.model."): v for k, v in saved.items()}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if missing:
        raise ValueError(f"{folder}: adapter weights that fit no layer of the model: {missing[:3]}")
    return merge_adapters(model) if merge else model


def trainable_params(model: nn.Module) -> int:
    """Parameters that train (tied ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
