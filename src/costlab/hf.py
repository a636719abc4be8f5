"""``model=hf``: any decoder-only causal LM that Hugging Face ``transformers`` loads, as a costlab model.

    python run.py model=hf model.pretrained=/path/to/save_pretrained/folder
    python run.py model=hf model.config=llama_tiny          # conf/hf_configs/llama_tiny.json, random weights
    python run.py model=hf model.config=/path/to/config.json

Loading goes through ``transformers``' own ``AutoModelForCausalLM.from_pretrained`` / ``from_config``. The
wrapper maps token ids ``(B, T)`` to logits ``(B, T, V)`` as every costlab model does, and shows the
decoder layers as ``blocks`` (not registered a second time: parameter names stay ``hf.<transformers'
names>``), so FSDP, activation checkpointing and compile act per decoder layer as they do on the GPTs.

The data are bytes: the model's vocabulary must hold the 256 byte values (the shipped configs have
``vocab_size: 256``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from costlab.hf_config import config_file
from costlab.model import GPTConfig


def decoder_layers(hf: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``transformers`` causal LM (``model.layers`` in Llama-style families,
    ``transformer.h`` in GPT-2)."""
    base = hf.get_decoder() if hasattr(hf, "get_decoder") else getattr(hf, hf.base_model_prefix)
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(hf).__name__}: no decoder layers found (looked for layers, h, blocks)")


def _get(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def gpt_view(config: dict[str, Any], block_size: int) -> GPTConfig:
    """The few shape facts costlab's cost model reads (layers, heads, width, vocabulary), from a Hugging
    Face config."""
    n_embd = _get(config, "hidden_size", "n_embd", "d_model")
    n_head = _get(config, "num_attention_heads", "n_head")
    return GPTConfig(vocab_size=_get(config, "vocab_size"), block_size=block_size,
                     n_layer=_get(config, "num_hidden_layers", "n_layer"), n_head=n_head, n_embd=n_embd)


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM: ``pretrained`` (a ``save_pretrained`` folder, or a hub id where the
    machine is online; when set, it wins over ``config``) or ``config`` (built with random weights from the
    run's seed); ``tokenizer`` is the data's business (:mod:`costlab.tokens`); ``block_size``:
    the sequence length costlab trains and evaluates at."""

    def __init__(self, pretrained: str | None = None, config: str | None = None, block_size: int = 128,
                 attn_implementation: str = "sdpa", tokenizer: str = "auto"):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        if pretrained is None and config is None:
            raise ValueError("model=hf needs model.pretrained or model.config")
        on_meta = torch.get_default_device().type == "meta"
        if pretrained is not None and not on_meta:
            self.hf = AutoModelForCausalLM.from_pretrained(
                pretrained, dtype=torch.float32, attn_implementation=attn_implementation)
        else:  # the architecture alone: random weights, or shapes only on the meta device
            hf_config = AutoConfig.from_pretrained(pretrained) if pretrained else \
                AutoConfig.from_pretrained(str(config_file(config)))
            self.hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                       attn_implementation=attn_implementation)
        self.hf.config.use_cache = False
        self.config = gpt_view(self.hf.config.to_dict(), block_size)
        # the decoder layers under the name the parallelism code uses; kept out of the module tree
        self.__dict__["_blocks"] = nn.ModuleDict({str(i): layer for i, layer in enumerate(decoder_layers(self.hf))})

    @property
    def blocks(self) -> nn.ModuleDict:
        return self.__dict__["_blocks"]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits

    def forward_with_cache(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits of ``idx`` and the key/value cache to continue from (``cache=None``: a new sequence)."""
        # transformers 5 names the cache ``cache``; earlier versions ``past_key_values``
        key = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
        out = self.hf(input_ids=idx, use_cache=True, **{key: cache})
        return out.logits, out[key]

    def save_pretrained(self, folder: str | Path) -> None:
        """The model as ``transformers`` saves it: ``AutoModelForCausalLM.from_pretrained(folder)`` loads it."""
        self.hf.save_pretrained(str(folder))

