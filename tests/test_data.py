import math
from collections import Counter

import pytest
import torch

from costlab.data import BatchSampler, eval_batches, is_text, pysource, synthetic, text_files, textfile


def test_pysource_is_real_text_with_a_deterministic_split():
    a, b = pysource(), pysource()
    assert a.train.numel() > 1_000_000 and a.val.numel() > 50_000
    assert torch.equal(a.val, b.val) and torch.equal(a.train, b.train)
    text = bytes(a.train[:10_000].tolist()).decode("utf-8", errors="strict")
    assert "def " in text or "import " in text


def test_pysource_unigram_entropy_is_near_the_documented_figure():
    corpus = pysource()
    counts = Counter(bytes(corpus.train.tolist()))
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert 2.9 < entropy < 3.4  # ~3.15 nats/byte for Python 3.11's top-level stdlib


def test_synthetic_entropy_floor_matches_the_sampled_text():
    corpus = synthetic(n_bytes=400_000, seed=7)
    data = corpus.train.tolist()
    pairs = Counter(zip(data, data[1:], strict=False))
    firsts = Counter(data[:-1])
    n = len(data) - 1
    empirical = -sum(c / n * math.log(c / firsts[a]) for (a, _), c in pairs.items())
    assert corpus.entropy_floor is not None
    assert abs(empirical - corpus.entropy_floor) / corpus.entropy_floor < 0.03


def test_synthetic_is_reproducible_from_its_seed():
    assert torch.equal(synthetic(n_bytes=5000, seed=3).train, synthetic(n_bytes=5000, seed=3).train)
    assert not torch.equal(synthetic(n_bytes=5000, seed=3).train, synthetic(n_bytes=5000, seed=4).train)


def test_textfile_reads_a_file_and_a_folder_skipping_binaries(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 500)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("héllo wörld\n" * 500)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "b.md"]
    corpus = textfile(str(tmp_path))
    assert corpus.train.numel() + corpus.val.numel() == 6000 + len("héllo wörld\n".encode()) * 500
    single = textfile(str(tmp_path / "a.txt"))
    assert single.val.numel() > 0 and single.train.numel() > single.val.numel()


def test_is_text_accepts_utf8_cut_mid_character(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(("é" * 40000).encode())
    assert is_text(path, probe=1001)  # 1001 bytes ends inside a two-byte character
    path.write_bytes(b"\xff\xfe\x00binary")
    assert not is_text(path)


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_is_the_same_whatever_the_world_size(world):
    data = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    sampler = BatchSampler(data, block_size=16, global_batch=8, seed=1)
    x1, y1 = sampler.batch(step=5)
    parts = [sampler.batch(step=5, rank=r, world=world) for r in range(world)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x1)
    assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(sampler.batch(step=6)[0], x1)


def test_eval_batches_cover_the_validation_text_deterministically():
    data = torch.arange(5000) % 256
    batches = eval_batches(data.to(torch.uint8), block_size=32, batch=4, n_batches=3)
    assert len(batches) == 3 and batches[0][0].shape == (4, 32)
    assert torch.equal(batches[0][0], eval_batches(data.to(torch.uint8), 32, 4, 3)[0][0])


def test_sampler_refuses_a_corpus_shorter_than_a_block():
    with pytest.raises(ValueError, match="block_size"):
        BatchSampler(torch.zeros(10, dtype=torch.uint8), block_size=16, global_batch=2, seed=0)
