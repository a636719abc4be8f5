"""What the launcher needs to know of a ``model=hf`` config without importing torch or transformers: where
its ``config.json`` is and what it says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from costlab import ROOT

TARGET = "costlab.models.hf.HFCausalLM"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CONFIG_DIR = ROOT / "conf" / "hf_configs"  # the small configs shipped for model.config=<name>


def is_hf(cfg: Any) -> bool:
    """Whether the run's model is a Hugging Face one (``model=hf``)."""
    return cfg.model.get("_target_") == TARGET


def config_file(config: str) -> Path:
    """The ``config.json`` that ``model.config`` names: a shipped config's name, a file, or a folder holding one."""
    path = Path(config).expanduser()
    if not path.suffix and not path.exists() and (CONFIG_DIR / f"{config}.json").is_file():
        return CONFIG_DIR / f"{config}.json"
    return path / "config.json" if path.is_dir() else path


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# transformers' model_type of the families a pipeline cuts into stages (:meth:`HFCausalLM.cut_to_stage`), each
# checked to compute, stage after stage, what it computes whole (tests/test_hf.py). Not every decoder can be cut so:
# Cohere's and Granite's causal LMs scale their logits in their own forward, which a last stage's head leaves out.
PIPELINE_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "olmo2", "gpt2", "gpt_neox")


# One decoder layer's tensor-parallel split (submodule -> "replicate", "colwise", "qkv_colwise", "rowwise", or
# "per_head": a module acting on each head apart, fed a rank's own heads, whose weights' gradients are all-reduced)
# in the families tensor parallel lays out (:func:`costlab.parallelism.tp.apply_hf_tp`), by transformers'
# model_type, each checked to compute, split over two ranks, what it computes whole (tests/test_hf.py). A column-wise
# split keeps whole heads
# only where a projection's outputs lie head by head and the attention reshapes them with ``-1`` heads: Llama-style
# q/k/v projections, GPT-NeoX's fused query_key_value (laid out per head). GPT-2's c_attn packs all queries, then all
# keys, then all values (``qkv_colwise``: each rank takes its heads of each, and its attention cuts a third as wide).
# Not so: Phi-3's qkv_proj (packed, but its attention cuts at the whole width's offsets); OLMo-2's q/k norms take
# their statistics over every head's outputs. Qwen3's q/k norms act on each head apart (``per_head``).
_LLAMA_LAYER = {
    "input_layernorm": "replicate", "post_attention_layernorm": "replicate",
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}
TP_LAYER_PLANS: dict[str, dict[str, str]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2"), _LLAMA_LAYER),
    "qwen3": {**_LLAMA_LAYER, "self_attn.q_norm": "per_head", "self_attn.k_norm": "per_head"},
    "gpt2": {"ln_1": "replicate", "ln_2": "replicate", "attn.c_attn": "qkv_colwise", "attn.c_proj": "rowwise",
             "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"},
    "gpt_neox": {"input_layernorm": "replicate", "post_attention_layernorm": "replicate",
                 "attention.query_key_value": "colwise", "attention.dense": "rowwise",
                 "mlp.dense_h_to_4h": "colwise", "mlp.dense_4h_to_h": "rowwise"},
}


def layer_count(config: dict[str, Any]) -> int:
    """The decoder layers of a Hugging Face config read as JSON (``num_hidden_layers``; GPT-2's ``n_layer``)."""
    return int(config.get("num_hidden_layers") or config["n_layer"])


def read_config(model_cfg: Any) -> dict[str, Any]:
    """The Hugging Face config (as a dict) of ``model.pretrained`` or ``model.config``, read as JSON: no
    ``transformers`` import, so the launcher can check it cheaply."""
    source = model_cfg.get("pretrained")
    path = Path(source).expanduser() / "config.json" if source else config_file(model_cfg.get("config"))
    return json.loads(path.read_text())


def tokenizer_folder(model_cfg: Any) -> Path | None:
    """The folder whose tokenizer the run uses: ``model.pretrained`` when it is a local folder holding one
    and ``model.tokenizer`` is ``auto`` (``bytes`` forces bytes); None: bytes."""
    choice = model_cfg.get("tokenizer", "bytes")
    source = model_cfg.get("pretrained")
    if choice == "bytes" or not source:
        return None
    folder = Path(str(source)).expanduser()
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return folder
    return None
