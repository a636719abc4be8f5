"""Which files are text: shared by the data group and the launcher's checks (so no torch import here)."""

from __future__ import annotations

from pathlib import Path


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
