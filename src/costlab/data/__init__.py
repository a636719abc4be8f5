"""Byte-level corpora and a deterministic, world-size independent batch sampler.

Every option of the ``data`` group is a function here that returns a :class:`ByteCorpus`; the
config names it with ``_target_``. The split into train and validation is a pure function of the
text, so every rank and every run sees the same split.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate

from costlab.files import is_text, pysource_files, text_files  # noqa: F401  (part of this module's API)

VAL_EVERY = 20  # one document in VAL_EVERY goes to validation (by a hash of its name)


@dataclass
class ByteCorpus:
    train: torch.Tensor  # uint8, 1-D
    val: torch.Tensor  # uint8, 1-D
    entropy_floor: float | None = None  # nats/byte, when the source is known exactly
    name: str = ""
    bytes_per_token: float = 1.0  # of the validation text: 1 for bytes, more once a tokenizer has run (see tokens)


def _split_documents(docs: list[tuple[str, bytes]], name: str) -> ByteCorpus:
    train, val = [], []
    for doc_name, text in docs:
        (val if zlib.crc32(doc_name.encode()) % VAL_EVERY == 0 else train).append(text)
    if not val:  # a single document: hold out its tail
        text = b"".join(train)
        cut = int(len(text) * (1 - 1 / VAL_EVERY))
        train, val = [text[:cut]], [text[cut:]]

    def as_tensor(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)

    return ByteCorpus(train=as_tensor(train), val=as_tensor(val), name=name)


def pysource(pattern: str = "*.py") -> ByteCorpus:
    """The installed Python standard library's top-level ``.py`` files: real text on every machine."""
    root, files = pysource_files(pattern)
    docs = [(f.name, f.read_bytes()) for f in files]
    return _split_documents(docs, f"pysource:{root}/{pattern}")


def textfile(path: str) -> ByteCorpus:
    """Any local UTF-8 file or folder of them."""
    root = Path(path)
    docs = [(str(f.relative_to(root) if root.is_dir() else f.name), f.read_bytes()) for f in text_files(root)]
    return _split_documents(docs, f"textfile:{root}")


def synthetic(
    n_bytes: int = 1_000_000, alphabet: int = 16, concentration: float = 0.2, seed: int = 1234
) -> ByteCorpus:
    """A first-order Markov language over ``alphabet`` letters with Dirichlet-random transitions.

    Its entropy rate, sum_i pi_i H(P_i), is the best loss any model can reach: a floor to test against.
    """
    g = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.full((alphabet, alphabet), concentration), torch.ones(()))
    torch.manual_seed(seed)  # Gamma sampling has no generator argument
    probs = gamma.sample().double() + 1e-12
    probs = probs / probs.sum(dim=1, keepdim=True)
    pi = torch.full((alphabet,), 1.0 / alphabet, dtype=torch.float64)
    for _ in range(10_000):
        nxt = pi @ probs
        if torch.allclose(nxt, pi, atol=1e-15):
            break
        pi = nxt
    entropy = float(-(pi[:, None] * probs * probs.log()).sum())
    # sample the chain in vectorised chunks of independent streams, then join them
    streams = 256
    length = math.ceil(n_bytes / streams)
    state = torch.multinomial(pi.float(), streams, replacement=True, generator=g)
    out = torch.empty(streams, length, dtype=torch.long)
    for t in range(length):
        out[:, t] = state
        state = torch.multinomial(probs[state].float(), 1, generator=g).squeeze(1)
    letters = (out.flatten()[:n_bytes] + ord("a")).to(torch.uint8)
    cut = int(n_bytes * (1 - 1 / VAL_EVERY))
    return ByteCorpus(
        train=letters[:cut].clone(), val=letters[cut:].clone(), entropy_floor=entropy, name="synthetic"
    )


class BatchSampler:
    """Draws the *global* batch of a step from a seed, then hands each data-parallel rank its slice.

    The global batch depends only on (seed, step), never on the world size: a run on 2 ranks sees
    exactly the samples a run on 1 rank sees, which is what makes runs comparable.
    """

    def __init__(self, data: torch.Tensor, block_size: int, global_batch: int, seed: int):
        if data.numel() <= block_size + 1:
            raise ValueError(f"the corpus has {data.numel()} bytes, fewer than block_size+1 ({block_size + 1})")
        self.data = data
        self.block_size = block_size
        self.global_batch = global_batch
        self.seed = seed

    def starts(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, self.data.numel() - self.block_size - 1, (self.global_batch,), generator=g)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts(step).chunk(world)[rank]
        offsets = torch.arange(self.block_size + 1)
        window = self.data[starts[:, None] + offsets].long()
        return window[:, :-1], window[:, 1:]


def eval_batches(
    data: torch.Tensor, block_size: int, batch: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced windows over the validation text: the same for every run and rank."""
    last = data.numel() - block_size - 1
    total = batch * n_batches
    starts = torch.linspace(0, last, total).long()
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets].long()
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]


def build_corpus(data_cfg) -> ByteCorpus:
    """Instantiate the ``data`` group's ``_target_``."""
    return instantiate({k: v for k, v in data_cfg.items() if k != "name"})
