"""Which files a corpus reads, and which files are text: shared by the data group and the launcher's checks
and provenance (so no torch import here); and files replaced whole, for readers in other processes."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a file of its own renamed into place: a reader in another process
    sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def pysource_files(pattern: str = "*.py") -> tuple[Path, list[Path]]:
    """The installed Python standard library's folder and its top-level files matching ``pattern``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(root.glob(pattern))


def corpus_digest(source: str, files: list[Path]) -> str:
    """A hash of the corpus: of the files' names and bytes, or, for generated text, of its source."""
    h = hashlib.sha256(source.encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:32]


def text_files(path: str | Path) -> list[Path]:
    """The UTF-8 files at ``path`` (a file, or a folder searched recursively), sorted."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [f for f in files if is_text(f)]


def is_text(path: Path, probe: int = 1 << 16) -> bool:
    with open(path, "rb") as f:
        raw = f.read(probe)
    if not raw or b"\x00" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut by the probe is still text
        return e.start >= len(raw) - 4
    return True
