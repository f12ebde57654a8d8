"""Disk cache of decoded, resized uint8 images, keyed by file content and target size.

Decoding 1024-px PNGs or DICOMs is the classic CPU bottleneck of training; with the cache, epochs after
the first read a small ``.npy`` instead. Keys hash the file's bytes, so an edited file is never served
stale, and a renamed file still hits. Entries are written atomically; a damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medai.data.io import decode_image
from medai.data.transforms import resize_to_uint8

log = logging.getLogger(__name__)

CACHE_VERSION = "v1"  # bump when decoding or resizing changes


class DecodeCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, data: bytes, size: int, kind: str = CACHE_VERSION) -> Path:
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        return self.root / f"{kind}-{size}" / digest[:2] / f"{digest}.npy"

    def load(self, path: str | os.PathLike, size: int) -> np.ndarray:
        return self.cached(path, size, CACHE_VERSION, lambda data: resize_to_uint8(
            decode_image(data, name=Path(path).name).pixels, size))

    def cached(self, path: str | os.PathLike, size: int, kind: str,
               compute: Callable[[bytes], np.ndarray]) -> np.ndarray:
        """A uint8 size x size array derived from a file's bytes: read from the cache folder ``kind``, or
        computed from the bytes and stored."""
        data = Path(path).read_bytes()
        entry = self.key(data, size, kind)
        if entry.is_file():
            try:
                arr = np.load(entry, allow_pickle=False)
                if arr.shape == (size, size) and arr.dtype == np.uint8:
                    self.hits += 1
                    return arr
            except (OSError, ValueError):
                pass
            log.warning("decode cache entry %s is damaged; recomputing", entry.name)
        self.misses += 1
        arr = compute(data)
        self._store(entry, arr)
        return arr

    def _store(self, entry: Path, arr: np.ndarray) -> None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as exc:  # a full or read-only cache disk slows training down but never stops it
            log.warning("cannot write decode cache entry (%s); continuing without caching", exc)
