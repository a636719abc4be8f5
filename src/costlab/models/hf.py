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

from costlab.models.gpt import GPTConfig
from costlab.models.hf_config import config_file


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
                     n_layer=_get(config, "num_hidden_layers", "n_layer"), n_head=n_head, n_embd=n_embd,
                     tie_weights=bool(config.get("tie_word_embeddings", True)))


class _NoPositions(nn.Module):
    """A later pipeline stage's learned position embedding: the first stage has added the positions already."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


def cut_decoder_ends(hf: nn.Module, first: bool, last: bool) -> None:
    """Leave out of ``hf``'s decoder, in place, what a pipeline stage does not run: on a stage after the first
    (``first`` false) the modules before its layers (the embedding, which makes the decoder take
    ``inputs_embeds``; GPT-2's learned positions, added to whatever comes in; an embedding dropout), on a stage
    before the last its final norm and the head (a rotary embedding, which holds no weights, stays)."""
    base, embedding, head = hf.get_decoder(), hf.get_input_embeddings(), hf.get_output_embeddings()
    layers = decoder_layers(hf)
    names = list(base._modules)
    at = names.index(next(n for n, c in base.named_children() if c is layers))
    if not first:  # a later stage takes the hidden state in: what made it from the tokens is the first's
        for name in names[:at]:
            child = base._modules[name]
            if child is embedding:
                setattr(base, name, None)  # the decoder's forward then takes inputs_embeds
            elif isinstance(child, nn.Embedding):  # GPT-2's learned positions, added to whatever comes in
                setattr(base, name, _NoPositions())
            elif isinstance(child, nn.Dropout):
                setattr(base, name, nn.Identity())
            elif any(True for _ in child.parameters()):
                raise ValueError(f"{type(base).__name__}.{name}: a pipeline stage cannot leave it out")
    if not last:
        for name in names[at + 1:]:
            if any(True for _ in base._modules[name].parameters()):
                setattr(base, name, nn.Identity())
        setattr(hf, next(n for n, c in hf.named_children() if c is head), None)


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM: ``pretrained`` (a ``save_pretrained`` folder, or a hub id where the
    machine is online; when set, it wins over ``config``) or ``config`` (built with random weights from the
    run's seed); ``tokenizer`` is the data's business (:mod:`costlab.data.tokens`); ``block_size``:
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
        # transformers 5 names the cache ``cache``; earlier versions ``past_key_values``
        self._cache_key = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
        self.config = gpt_view(self.hf.config.to_dict(), block_size)
        self.stage: tuple[int, int] | None = None  # (stage, stages) once cut into a pipeline stage
        # the decoder layers under the name the parallelism code uses; kept out of the module tree
        self.__dict__["_blocks"] = nn.ModuleDict({str(i): layer for i, layer in enumerate(decoder_layers(self.hf))})

    @property
    def blocks(self) -> nn.ModuleDict:
        return self.__dict__["_blocks"]

    @property
    def wte(self) -> nn.Module | None:
        """The token embedding (None on a pipeline stage after the first)."""
        return self.hf.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module | None:
        """The output head (None on a pipeline stage before the last)."""
        return self.hf.get_output_embeddings()

    def cut_to_stage(self, stage: int, stages: int) -> None:
        """Keep, in place, pipeline stage ``stage``'s decoder layers under their own names ("layers.5" stays
        "layers.5"); the decoder's modules before its layers (the embedding, GPT-2's learned positions, an
        embedding dropout) on the first stage only, its final norm and the head on the last only. The families of
        :data:`costlab.models.hf_config.PIPELINE_FAMILIES` (their decoders run embedding, layers, final norm and
        nothing a later stage would repeat)."""
        layers = decoder_layers(self.hf)
        per_stage = len(layers) // stages
        keep = {str(i) for i in range(stage * per_stage, (stage + 1) * per_stage)}
        for name in [n for n in layers._modules if n not in keep]:
            del layers._modules[name]  # not `del layers[i]`, which would renumber the rest
        self.__dict__["_blocks"] = nn.ModuleDict(dict(layers._modules))
        cut_decoder_ends(self.hf, first=stage == 0, last=stage == stages - 1)
        self.stage = (stage, stages)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.stage is None:
            return self.hf(input_ids=idx, use_cache=False).logits
        # a pipeline stage: token ids in on the first, the hidden state in on the others
        first, head = self.wte is not None, self.lm_head
        hidden = self.hf.get_decoder()(input_ids=idx if first else None, inputs_embeds=None if first else idx,
                                       use_cache=False).last_hidden_state
        return hidden if head is None else head(hidden)

    def forward_with_cache(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits of ``idx`` and the key/value cache to continue from (``cache=None``: a new sequence)."""
        out = self.hf(input_ids=idx, use_cache=True, **{self._cache_key: cache})
        return out.logits, out[self._cache_key]

    def forward_padded(self, idx: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       cache: Any) -> tuple[torch.Tensor, Any]:
        """:meth:`forward_with_cache` for a batch of sequences of different lengths, left-padded: the mask says
        which of the positions so far (cached and new) each sequence has, the position ids where each new
        token stands in its own sequence (what serving runs, :mod:`costlab.measure.serving`)."""
        out = self.hf(input_ids=idx, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **{self._cache_key: cache})
        return out.logits, out[self._cache_key]

    def save_pretrained(self, folder: str | Path) -> None:
        """The model as ``transformers`` saves it: ``AutoModelForCausalLM.from_pretrained(folder)`` loads it."""
        self.hf.save_pretrained(str(folder))

