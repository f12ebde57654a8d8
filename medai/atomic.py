"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

The temporary file is created the way ``open(path, "w")`` would create the file itself: mode 0666 less the
process umask, or the mode of the file it replaces. (``tempfile.mkstemp`` makes every file 0600, so a shipped
model or a backup written by one account could not be read by the dashboard's service account.)"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    ``mode`` (e.g. 0o600 for a secret) is set on the temporary file before anything is written to it;
    without it the file gets the mode ``open(path, "w")`` would give."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path, mode = _create_temporary(target, mode)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
            if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) != mode:  # a writer that made its own file
                os.fchmod(fh.fileno(), mode)  # (safetensors' save_file does: 0600) gets the intended mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _create_temporary(target: Path, mode: int | None = None) -> tuple[Path, int]:
    """An empty temporary file beside ``target`` and the mode it was given."""
    if mode is None:
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            pass
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[BinaryIO]:
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
