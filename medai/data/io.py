"""Decode any supported input (PNG, JPEG, 16-bit PNG, DICOM) into a float32 grayscale array in [0, 1].

The type is sniffed from the file's bytes, never its name. Limits guard against huge files and
decompression bombs. Every failure raises a subclass of :class:`ImageDecodeError` whose message a
radiologist can act on. Patient-identifying DICOM tags never enter the returned metadata.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medai.errors import MedaiError


class ImageDecodeError(MedaiError):
    """The input cannot be turned into an image."""


class UnsupportedFormatError(ImageDecodeError):
    pass


class CorruptImageError(ImageDecodeError):
    pass


class ImageTooLargeError(ImageDecodeError):
    pass


class ImageTooSmallError(ImageDecodeError):
    pass


class DicomNoPixelDataError(ImageDecodeError):
    pass


@dataclass(frozen=True)
class DecodeLimits:
    max_file_bytes: int = 256 * 1024 * 1024
    max_pixels: int = 100_000_000  # 10,000 x 10,000
    min_side: int = 16


DEFAULT_LIMITS = DecodeLimits()


def reason(exc: BaseException) -> str:
    """An exception's message for people: one line, without object reprs such as
    ``<_io.BytesIO object at 0x7f...>`` (internals, and a memory address)."""
    text = re.sub(r"\s*<[^<>]*? at 0x[0-9a-fA-F]+>", "", str(exc))
    return re.sub(r"\s*\n\s*", "; ", text).replace(":; ", ": ").strip() or type(exc).__name__


def read_regular_file(path: Path, label: str, limit: int) -> bytes:
    """A regular file's bytes, refused past ``limit``; directories, devices (``/dev/zero``), FIFOs and
    sockets are refused before anything is read (their size says nothing, a FIFO would block)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise ImageDecodeError(f"{label}: is a folder, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read the file ({exc.strerror or reason(exc)})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError(f"{label}: is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                    else "a device")
            raise ImageDecodeError(f"{label}: is {kind}, not a regular file; only image files are read")
        if info.st_size > limit:
            raise ImageTooLargeError(f"{label}: file is {info.st_size / 2**20:.0f} MB, above the "
                                     f"{limit / 2**20:.0f} MB limit; export a smaller image")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)  # a hard cap, whatever the size said
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read the file ({exc.strerror or reason(exc)})") from None
    finally:
        os.close(fd)
    return data


@dataclass
class ImageMeta:
    source_format: str  # png | jpeg | dicom
    width: int
    height: int
    bits: int
    photometric: str  # MONOCHROME1 / MONOCHROME2 / RGB / L ...
    view: str | None = None  # PA / AP / LATERAL when known
    modality: str | None = None
    body_part: str | None = None
    windowed: bool = False  # a DICOM VOI LUT / window was applied
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32, HxW, in [0, 1], dark = low attenuation (lungs dark on chest X-rays)
    meta: ImageMeta
    # The image in its own units for a viewer's window/level (grey DICOM: the modality-rescaled values
    # before any window, in the smallest dtype that holds them exactly); None: ``pixels`` x 255 (PNG/JPEG).
    values: np.ndarray | None = None
    # Patient and study fields of a DICOM (name, ID, dates, accession...): for signed-in readers and the
    # report only, never in logs, History or result JSON; kept apart from ``meta`` for that reason.
    study: dict[str, str] = field(default_factory=dict, repr=False)


def sniff_format(head: bytes) -> str | None:
    """Return 'png', 'jpeg' or 'dicom' from a file's first bytes (>= 132 for DICOM), else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def decode_image(source: str | os.PathLike | bytes, limits: DecodeLimits = DEFAULT_LIMITS,
                 name: str | None = None) -> DecodedImage:
    """Decode a path or raw bytes. ``name`` is only used in error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "upload"
    else:
        path = Path(source)
        label = name or path.name or str(path)
        data = read_regular_file(path, label, limits.max_file_bytes)
    if len(data) > limits.max_file_bytes:
        raise ImageTooLargeError(f"{label}: file is {len(data) / 2**20:.0f} MB, above the "
                                 f"{limits.max_file_bytes / 2**20:.0f} MB limit; export a smaller image")
    if not data:
        raise CorruptImageError(f"{label}: the file is empty (0 bytes); upload or export the image again")
    kind = sniff_format(data[:132])
    if kind is None:
        raise UnsupportedFormatError(
            f"{label}: not a PNG, JPEG or DICOM image (its content matches none of them, whatever its "
            "name says); upload a chest X-ray as PNG, JPEG or DICOM")
    if kind == "dicom":
        from medai.data.dicom import decode_dicom

        return decode_dicom(data, label, limits)
    return _decode_raster(data, kind, label, limits)


def _check_size(width: int, height: int, label: str, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{label}: {width} x {height} pixels is above the limit of {limits.max_pixels:,} pixels "
            "(possible decompression bomb); downscale the image before uploading")
    if min(width, height) < limits.min_side:
        raise ImageTooSmallError(f"{label}: {width} x {height} pixels is too small; at least "
                                 f"{limits.min_side} pixels per side are needed")


def _decode_raster(data: bytes, kind: str, label: str, limits: DecodeLimits) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(data))
            _check_size(img.width, img.height, label, limits)
            img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,} pixels" if found else "its pixel count"
        raise ImageTooLargeError(f"{label}: {count} is above the limit of {limits.max_pixels:,} pixels "
                                 "(possible decompression bomb); downscale the image before uploading") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"{label}: the {kind.upper()} file is damaged or truncated and cannot be "
                                f"decoded ({reason(exc)}); re-export it from the source") from None
    img = ImageOps.exif_transpose(img) if kind == "jpeg" else img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
        bits = 16
    elif mode == "I":
        raw = np.asarray(img, dtype=np.int64)
        bits = 16 if raw.max(initial=0) <= 65535 else 32
        arr = (raw.astype(np.float64) / (2**bits - 1)).astype(np.float32)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        bits = 32
        arr = _minmax(arr)
    else:
        if mode in ("LA", "RGBA", "PA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        bits = 8
    meta = ImageMeta(source_format=kind, width=img.width, height=img.height, bits=bits,
                     photometric="MONOCHROME2" if mode in ("L", "I;16", "I;16B", "I", "F", "1") else mode)
    return DecodedImage(np.ascontiguousarray(arr, dtype=np.float32), meta)


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] in a new float32 array."""
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())  # NaN or inf here: take the slow, careful path
    if not np.isfinite(lo) or not np.isfinite(hi):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if not np.isfinite(lo) or not np.isfinite(hi):
            arr = np.nan_to_num(arr, nan=lo if np.isfinite(lo) else 0.0)
            lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    out = arr - np.float32(lo)  # a new array: the caller's stays as it was
    out /= np.float32(hi - lo)
    return out
