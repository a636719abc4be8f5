"""Text to token ids and back: bytes (costlab's own models, and any model without a tokenizer), or the
tokenizer a Hugging Face model folder ships (``model.tokenizer=auto``, the default of ``model=hf``).

The corpora are bytes (:mod:`costlab.data`); a tokenizer turns them into token ids once, in every rank
alike, and records how many bytes of text a token stands for, so that quality is also reported in bits
per byte (``eval/bits_per_byte``): one scale for byte-level models and for any vocabulary.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch

from costlab.data import ByteCorpus
from costlab.models.hf_config import tokenizer_folder

TOKENIZER_TAG = "costlab.tokenizer"  # "bytes", or "tokenizer:<folder>"


class Codec(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteCodec:
    """UTF-8 bytes, one token each (invalid sequences decode to U+FFFD)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFCodec:
    """A ``transformers`` tokenizer (``AutoTokenizer.from_pretrained(folder)``), no special tokens added."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.name = f"tokenizer:{folder}"
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def load_codec(model_cfg: Any) -> Codec:
    folder = tokenizer_folder(model_cfg)
    return ByteCodec() if folder is None else HFCodec(folder)


def tokenize_corpus(corpus: ByteCorpus, codec: Codec) -> ByteCorpus:
    """``corpus`` as ``codec``'s token ids (unchanged for bytes), with the bytes each validation token stands for."""
    if isinstance(codec, ByteCodec):
        return corpus

    def ids(data: torch.Tensor) -> torch.Tensor:
        text = bytes(data.numpy()).decode("utf-8", errors="replace")
        return torch.tensor(codec.encode(text), dtype=torch.int32)

    train, val = ids(corpus.train), ids(corpus.val)
    # a per-byte entropy floor says nothing per token: dropped rather than converted by an average
    return replace(corpus, train=train, val=val, entropy_floor=None, name=f"{corpus.name} ({codec.name})",
                   bytes_per_token=corpus.val.numel() / max(1, val.numel()))
