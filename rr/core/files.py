"""Atomic, owner-only file writes (what a resume trusts is never half-written, and job files can hold forget data),
and the one reader of rr's line-per-entry text files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from rr.errors import RRError


def read_lines(path: Path, what: str) -> list[str]:
    """The stripped non-empty lines of a UTF-8 text file (one entry per line); an unreadable file is an RRError
    naming `what` it should hold."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RRError(f"{path}: cannot read {what} ({exc})") from exc


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


def atomic_write_dir(path: Path, write: Callable[[str], object]) -> Path:
    """write(tmp_dir) into a temp directory beside `path`, then rename it to `path`: readers see no directory or
    the whole one. Where another writer got there first, theirs is kept and ours removed (both wrote the same)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        write(tmp)
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) to `path` through atomic_write."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
