"""Atomic, owner-only file writes: what a resume trusts is never half-written, and job files can hold forget data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """write(tmp_path) into a temp file beside `path` (mode 0600), then os.replace: readers see the old file
    or the whole new one, never a part. The temp file is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) to `path` through atomic_write."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
