"""Byte-level language models: a GPT family (nanoGPT layout, optional Llama parts) and an MLP baseline.

Every model maps token ids ``(B, T)`` to logits ``(B, T, vocab_size)``; the loss lives in the trainer
so that parallel wrappers (pipeline stages in particular) can place it where they need to.

Attention keeps separate ``c_q``/``c_k``/``c_v`` projections and infers the number of heads from the
projection's output width, so tensor-parallel sharding and structured head pruning only have to
change the weights, never the module's attributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]  # one block's keys and values, (B, H, T, D) each


@dataclass
class KVCache:
    """What :meth:`GPT.forward_with_cache` carries between calls: each block's keys and values, and how
    many positions they cover."""

    layers: list[KV]
    pos: int


KV_CACHE_DTYPES = ("auto", "bf16", "fp8", "int8")  # serve.kv_cache_dtype for costlab's slot cache
_SCALED = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}  # storage dtype, its largest value


@dataclass
class SlotCache:
    """The keys and values of a fixed number of sequence slots, for serving many sequences at once
    (:meth:`GPT.forward_slots`): per block a ``(slots, H, length, D)`` pair, allocated at the block's first
    write (a pruned block may have fewer heads), and each slot's filled length. A slot is reused by
    resetting its length to 0; its stale keys and values are masked out, never read.

    ``kv_dtype``: ``auto`` stores keys and values as computed; ``bf16`` in bfloat16; ``fp8`` (e4m3) and
    ``int8`` with one fp32 scale per token and head (its absolute maximum over the head's channels maps to
    the type's largest value), dequantized when read."""

    slots: int
    length: int
    kv_dtype: str = "auto"
    layers: list[tuple[torch.Tensor, ...] | None] = field(default_factory=list)  # K, V (, K scales, V scales)
    lengths: torch.Tensor | None = None  # (slots,) int64

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_dtype={self.kv_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")

    def _allocate(self, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shape = (self.slots, k.size(2), self.length, k.size(3))  # k: (B, T, H, D) as written
        dtype = {"auto": k.dtype, "bf16": torch.bfloat16}.get(self.kv_dtype) or _SCALED[self.kv_dtype][0]
        if dtype == torch.float8_e4m3fn:  # indexed writes want a byte type: fp8 is kept as its bytes
            dtype = torch.uint8
        out = (k.new_zeros(shape, dtype=dtype), k.new_zeros(shape, dtype=dtype))
        if self.kv_dtype in _SCALED:  # one scale per slot, head and position, for keys and for values
            scales = shape[:3] + (1,)
            out += (k.new_zeros(scales, dtype=torch.float32), k.new_zeros(scales, dtype=torch.float32))
        return out

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kv_dtype not in _SCALED:
            return x, None
        dtype, top = _SCALED[self.kv_dtype]
        scale = (x.float().abs().amax(dim=-1, keepdim=True) / top).clamp(min=torch.finfo(torch.float32).tiny)
        q = x.float() / scale
        q = q.round().clamp(-top, top).to(dtype) if dtype == torch.int8 else q.to(dtype).view(torch.uint8)
        return q, scale

    def _decode(self, q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if scale is None:
            return q.to(dtype)
        stored = q.view(torch.float8_e4m3fn) if self.kv_dtype == "fp8" else q
        return (stored.float() * scale).to(dtype)

    def write(self, i: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Block ``i``'s keys and values ``(B, H, T, D)`` of the sequences in ``slots``, at their ``positions``
        (B, T)."""
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D): the layout the indexing below gives
        while len(self.layers) <= i:
            self.layers.append(None)
        if self.layers[i] is None:
            self.layers[i] = self._allocate(k)
        layer, rows = self.layers[i], slots[:, None]
        for n, x in enumerate((k, v)):
            q, scale = self._encode(x)
            layer[n][rows, :, positions] = q.to(layer[n].dtype)
            if scale is not None:
                layer[2 + n][rows, :, positions] = scale

    def read(self, i: int, slots: torch.Tensor, seen: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s keys and values ``(B, H, seen, D)`` of ``slots``' first ``seen`` positions, in ``dtype``."""
        layer = self.layers[i]
        scales = (layer[2][slots, :, :seen], layer[3][slots, :, :seen]) if len(layer) > 2 else (None, None)
        return (self._decode(layer[0][slots, :, :seen], scales[0], dtype),
                self._decode(layer[1][slots, :, :seen], scales[1], dtype))

    def bytes(self) -> int:
        """Bytes the allocated keys, values and scales take."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer is not None for t in layer)


class SlotStep(NamedTuple):
    """One :meth:`GPT.forward_slots` call's tokens: their sequences' ``slots`` (B,), their ``positions`` (B, T),
    and which cached positions each may attend to, ``mask`` (B, 1, T, positions seen)."""

    slots: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    mlp_multiple_of: int = 1  # the MLP width rounded up to a multiple of this (Llama's ``multiple_of``: 256)
    bias: bool = False
    dropout: float = 0.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    mlp: str = "gelu"  # gelu | swiglu
    tie_weights: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        hidden = int(self.mlp_ratio * self.n_embd)
        if self.mlp == "swiglu":  # keep the parameter count of a gelu MLP, as Llama does
            hidden = 2 * hidden // 3
        return -(-hidden // self.mlp_multiple_of) * self.mlp_multiple_of


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=1e-6)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def rope_tables(head_dim: int, block_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
    # x: (B, H, T, D) at positions offset … offset+T-1, or at the (B, T) positions ``offset`` holds; rotate the
    # two halves of each head (GPT-NeoX convention)
    t = x.size(-2)
    if isinstance(offset, torch.Tensor):
        cos, sin = cos[offset].unsqueeze(1).to(x.dtype), sin[offset].unsqueeze(1).to(x.dtype)  # (B, 1, T, D/2)
    else:
        cos, sin = cos[offset:offset + t].to(x.dtype), sin[offset:offset + t].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_head must divide n_embd"
        self.head_dim = cfg.head_dim
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_k = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_v = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.rope = cfg.pos == "rope"

    def _qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
             offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (B, H, T, D) of ``x``, at positions ``offset`` … (or at the (B, T)
        positions a tensor ``offset`` holds) for rotary positions."""
        b, t, _ = x.shape
        # -1 heads: the local head count after tensor-parallel sharding or head pruning
        q = self.c_q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope, offset=offset), apply_rope(k, *rope, offset=offset)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._qkv(x, rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.c_proj(y)

    def forward_with_cache(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, past: KV | None, offset: int
    ) -> tuple[torch.Tensor, KV]:
        """``x`` holds the tokens at positions ``offset`` … after the ``past`` keys and values (None: none).
        Returns the output and the keys and values of every position so far."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, rope, offset)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        total = k.size(2)
        if past is None:  # prefill: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens: each sees the cache and the new tokens up to itself
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(diagonal=total - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.c_proj(y), (k, v)

    def forward_slots(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: SlotCache,
                      layer: int, step: SlotStep) -> torch.Tensor:
        """``x`` holds the tokens of ``step``: their keys and values are written into ``cache`` (as block
        ``layer``'s), and each token attends to its own slot's positions up to itself, read back from the cache
        (a slot's positions beyond its length are masked out)."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, rope, step.positions)
        cache.write(layer, step.slots, step.positions, k, v)
        keys, values = cache.read(layer, step.slots, step.mask.size(-1), q.dtype)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.hidden_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        if self.swiglu:
            self.c_fc2 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.c_proj(F.silu(self.c_fc(x)) * self.c_fc2(x))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), rope))
        return x + self.drop(self.mlp(self.ln_2(x)))

    def forward_with_cache(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, past: KV | None, offset: int
    ) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn.forward_with_cache(self.ln_1(x), rope, past, offset)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln_2(x))), kv

    def forward_slots(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: SlotCache,
                      layer: int, step: SlotStep) -> torch.Tensor:
        x = x + self.drop(self.attn.forward_slots(self.ln_1(x), rope, cache, layer, step))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """A GPT-2 style decoder; ``norm=rmsnorm pos=rope mlp=swiglu`` gives the Llama variant.

    Blocks live in ``self.blocks`` (an ``nn.ModuleDict`` keyed "0", "1", …) so that pipeline stages can
    delete the blocks they do not own and keep the original names, as torchtitan does; ``wte``,
    ``wpe``, ``ln_f`` and ``lm_head`` may be ``None`` on a stage that does not own them.
    """

    def __init__(self, **kwargs):
        super().__init__()
        cfg = GPTConfig(**kwargs)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # On a pipeline stage without the embedding, ``idx`` is already the hidden state.
        if self.wte is not None:
            x = self.wte(idx)
            if self.wpe is not None:
                x = x + self.wpe(torch.arange(idx.size(1), device=idx.device))
            x = self.drop(x)
        else:
            x = idx
        rope = (self.rope_cos, self.rope_sin) if self.config.pos == "rope" else None
        for block in self.blocks.values():
            x = block(x, rope)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def forward_with_cache(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits of the tokens ``idx`` (B, T) and the cache to continue from. ``cache=None`` starts at
        position 0 (prefill); otherwise ``idx`` holds the token(s) that follow the cached positions.
        The same submodules as :meth:`forward` run, so compressed (pruned, quantized) layers are used as they are."""
        if self.wte is None or self.ln_f is None or self.lm_head is None:
            raise RuntimeError("generation needs the whole model, not a pipeline stage")
        start = 0 if cache is None else cache.pos
        t = idx.size(1)
        if start + t > self.config.block_size:
            raise ValueError(f"positions up to {start + t} exceed the model's block_size={self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + t, device=idx.device))
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin) if self.config.pos == "rope" else None
        layers = []
        for i, block in enumerate(self.blocks.values()):
            x, kv = block.forward_with_cache(x, rope, None if cache is None else cache.layers[i], start)
            layers.append(kv)
        return self.lm_head(self.ln_f(x)), KVCache(layers, start + t)

    def forward_slots(self, idx: torch.Tensor, cache: SlotCache, slots: torch.Tensor) -> torch.Tensor:
        """Logits of the tokens ``idx`` (B, T) that follow what ``cache`` holds for the sequences in ``slots``
        (B,), whose lengths grow by T: a prefill of one slot (B=1, T=prompt) or a decode step of several
        (T=1), each sequence at its own position. What continuous batching runs (:mod:`costlab.measure.serving`)."""
        if self.wte is None or self.ln_f is None or self.lm_head is None:
            raise RuntimeError("serving needs the whole model, not a pipeline stage")
        if cache.lengths is None:
            cache.lengths = torch.zeros(cache.slots, dtype=torch.long, device=idx.device)
        positions = cache.lengths[slots][:, None] + torch.arange(idx.size(1), device=idx.device)
        seen = int(positions.max()) + 1  # the one host sync of a step
        if seen > min(cache.length, self.config.block_size):
            raise ValueError(f"positions up to {seen} exceed the cache's length {cache.length} "
                             f"or the model's block_size={self.config.block_size}")
        mask = torch.arange(seen, device=idx.device) <= positions[:, :, None]  # (B, T, seen)
        step = SlotStep(slots, positions, mask[:, None])
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin) if self.config.pos == "rope" else None
        for i, block in enumerate(self.blocks.values()):
            x = block.forward_slots(x, rope, cache, i, step)
        cache.lengths[slots] += idx.size(1)
        return self.lm_head(self.ln_f(x))


class MLPLM(nn.Module):
    """A Bengio-style MLP language model: the next byte from a fixed window of previous bytes.

    Causal by construction: position t sees bytes t-context+1 … t (left-padded with zeros).
    """

    def __init__(
        self, vocab_size: int = 256, block_size: int = 128, context: int = 8, n_embd: int = 64, hidden: int = 512
    ):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=0, n_head=1, n_embd=n_embd)
        self.context = context
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.c_fc = nn.Linear(context * n_embd, hidden)
        self.c_proj = nn.Linear(hidden, n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)  # (B, T, C)
        x = F.pad(x, (0, 0, self.context - 1, 0))  # left pad along time
        windows = x.unfold(1, self.context, 1)  # (B, T, C, context)
        windows = windows.transpose(-1, -2).flatten(2)  # (B, T, context * C), oldest byte first
        return self.lm_head(self.c_proj(F.gelu(self.c_fc(windows))))

    def forward_with_cache(
        self, idx: torch.Tensor, cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the tokens ``idx`` (B, T) and the cache to continue from: the embeddings of the last
        ``context - 1`` positions (zeros before the first token, as :meth:`forward` pads), from which each
        new token's window is rebuilt. ``cache=None`` starts a sequence."""
        x = self.wte(idx)
        if cache is None:
            cache = x.new_zeros(x.size(0), self.context - 1, x.size(2))
        x = torch.cat((cache, x), dim=1)
        windows = x.unfold(1, self.context, 1).transpose(-1, -2).flatten(2)
        logits = self.lm_head(self.c_proj(F.gelu(self.c_fc(windows))))
        return logits, x[:, x.size(1) - (self.context - 1):]


def build_model(model_cfg) -> nn.Module:
    """Instantiate the ``model`` group's ``_target_`` (its ``name`` key is for people, not the class)."""
    return instantiate({k: v for k, v in model_cfg.items() if k != "name"})


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` is built of transformer blocks (the GPT family; the MLP baseline is not)."""
    return isinstance(getattr(model, "blocks", None), nn.ModuleDict)
