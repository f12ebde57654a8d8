"""Decode any supported input (PNG, JPEG, 16-bit PNG, DICOM) into a float32 grayscale array in [0, 1].

The type is sniffed from the file's bytes, never its name. Limits guard against huge files and
decompression bombs. Every failure raises a subclass of :class:`ImageDecodeError` whose message a
radiologist can act on. Patient-identifying DICOM tags never enter the returned metadata.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
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


class _NoTraceback(logging.Filter):
    """pydicom logs every decoder plugin that fails, with its traceback, before it raises; the error this
    module raises names the file and the cause, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_NoTraceback())


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
        return _decode_dicom(data, label, limits)
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


def _decode_dicom(data: bytes, label: str, limits: DecodeLimits) -> DecodedImage:
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    damaged = (InvalidDicomError, BytesLengthException, EOFError, OSError, ValueError, KeyError, TypeError,
               struct.error, NotImplementedError, ArithmeticError, IndexError, AttributeError)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
    except damaged as exc:
        raise CorruptImageError(f"{label}: the DICOM file is damaged and cannot be read ({reason(exc)})") from None
    if any("End of file reached" in str(w.message) for w in caught):
        raise CorruptImageError(f"{label}: the DICOM file is truncated (it ends inside an element); "
                                "copy it again from the PACS or modality")
    try:
        return _interpret_dicom(ds, label, limits)
    except ImageDecodeError:
        raise
    except damaged as exc:
        # pydicom parses elements lazily, so a damaged header surfaces here, on first access
        raise CorruptImageError(f"{label}: the DICOM header is damaged and cannot be interpreted "
                                f"({type(exc).__name__}: {reason(exc)}); copy it again from the PACS or modality") from None


def _count(ds: Any, keyword: str, default: int, label: str) -> int:
    """A DICOM element that must hold one non-negative whole number (Rows, Columns, NumberOfFrames...)."""
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        number = float(value)  # a multi-valued element (a list) raises TypeError
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if not (np.isfinite(number) and number >= 0 and number == int(number)):
        raise CorruptImageError(f"{label}: the DICOM element {keyword} should be one whole number, not "
                                f"{str(value)[:40]!r}; the file's header is damaged")
    return int(number)


def _interpret_dicom(ds: Any, label: str, limits: DecodeLimits) -> DecodedImage:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if any(k in ds for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")):
            raise DicomNoPixelDataError(
                f"{label}: this DICOM object holds no image data although its header describes an image "
                "(no Pixel Data element after the image attributes): the file is probably truncated or was "
                "exported without its pixels; copy it again from the PACS or modality")
        raise DicomNoPixelDataError(
            f"{label}: this DICOM object holds no image (no Pixel Data element; it may be a report, "
            "structured report or presentation state); export the image series instead")
    rows, cols = _count(ds, "Rows", 0, label), _count(ds, "Columns", 0, label)
    _check_size(cols, rows, label, limits)
    frames = max(1, _count(ds, "NumberOfFrames", 1, label))
    try:
        arr = ds.pixel_array if frames == 1 else _first_frame(ds)
    except Exception as exc:  # pydicom raises many types for bad pixel data / missing decoders
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", syntax) or "unknown"
        raise CorruptImageError(
            f"{label}: the DICOM pixel data cannot be decoded (transfer syntax: {syntax_name}; {reason(exc)})"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    notes: list[str] = []
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM (RGB / YBR converted by pydicom)
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        values, windowed = None, False  # no stored grey values: a viewer windows the decoded grey levels
    elif arr.ndim != 2:
        raise CorruptImageError(f"{label}: unexpected DICOM pixel array shape {arr.shape}")
    else:
        values, arr, windowed = _apply_luts(arr, ds, notes)
    arr = _minmax(np.asarray(arr, dtype=np.float32))
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    bits = _count(ds, "BitsStored", 8, label) if "BitsStored" in ds else 8
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    meta = ImageMeta(
        source_format="dicom", width=int(arr.shape[1]), height=int(arr.shape[0]), bits=bits,
        photometric=photometric, view=_clean(ds.get("ViewPosition")), modality=_clean(ds.get("Modality")),
        body_part=_clean(ds.get("BodyPartExamined")), windowed=windowed,
        extra={"frames": frames, "transfer_syntax": syntax, **({"warnings": notes} if notes else {}),
               **({"units": _units(ds, windowed)} if values is not None else {})},
    )
    return DecodedImage(np.ascontiguousarray(arr, dtype=np.float32), meta, values, _study(ds))


STUDY_FIELDS = {"PatientName": "Patient", "PatientID": "Patient ID", "PatientBirthDate": "Born",
                "PatientSex": "Sex", "StudyDate": "Study date", "StudyTime": "Study time",
                "AccessionNumber": "Accession", "StudyDescription": "Study", "SeriesDescription": "Series",
                "InstitutionName": "Institution", "ReferringPhysicianName": "Referring",
                "StudyInstanceUID": "Study UID"}


def _study(ds: Any) -> dict[str, str]:
    """The patient and study fields the file has (blank ones left out), as text of at most 64 characters."""
    out = {}
    for keyword, title in STUDY_FIELDS.items():
        try:
            text = str(ds.get(keyword) or "").replace("^", " ").strip()
        except _MALFORMED:
            continue
        if text:
            out[title] = "".join(c if c.isprintable() else " " for c in text)[:64]
    return out


def _units(ds: Any, windowed: bool) -> dict[str, Any]:
    """What ``values`` are (the rescale type; HU for CT) and the file's own windows (centre, width,
    explanation; none when the decoder could not apply them), for a viewer's presets; MONOCHROME1 says
    high values are shown dark."""
    from pydicom.multival import MultiValue

    def listed(keyword: str) -> list:
        value = ds.get(keyword)
        return [] if value is None or value == "" else list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]

    windows = []
    try:
        names = [str(n) for n in listed("WindowCenterWidthExplanation")]
        for i, (center, width) in enumerate(zip(listed("WindowCenter"), listed("WindowWidth"))):
            center, width = float(center), float(width)
            if np.isfinite(center) and np.isfinite(width) and width >= 1:
                windows.append({"center": center, "width": width, "name": names[i] if i < len(names) else ""})
    except _MALFORMED:
        windows = []
    modality = str(ds.get("Modality") or "").upper()
    name = str(ds.get("RescaleType") or "").strip() or ("HU" if modality == "CT" else "")
    return {"name": name or "stored value", "windows": windows if windowed else [],
            "monochrome1": str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"}


def _compact(values: np.ndarray) -> np.ndarray:
    """The rescaled values in the smallest dtype that holds them exactly (int16/uint16 for most films)."""
    if values.dtype.kind in "iu":
        for dtype in (np.int16, np.uint16, np.int32):
            if values.min() >= np.iinfo(dtype).min and values.max() <= np.iinfo(dtype).max:
                return values.astype(dtype, copy=False)
        return values
    values = np.asarray(values, dtype=np.float32)
    if np.all(np.isfinite(values)) and np.array_equal(values, np.round(values)):
        return _compact(values.astype(np.int64))
    return values


# What pydicom raises for a malformed rescale or window element (also on first access: it parses lazily)
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, OverflowError)


def _apply_luts(arr: np.ndarray, ds: Any, notes: list[str]) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """Rescale and window as the file says: (the rescaled values, or None when they are not finite; the
    windowed image; whether a window was applied). A malformed LUT or window is skipped with a note, not
    fatal: the min-max normalisation that follows still shows the image, which is what a viewer would do."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        arr = apply_modality_lut(arr, ds)
    except _MALFORMED as exc:
        notes.append(f"modality rescale ignored (malformed: {exc})")
    finite = bool(np.all(np.isfinite(arr))) if arr.dtype.kind == "f" else True
    values = _compact(arr) if finite else None
    if not any(k in ds for k in ("WindowCenter", "VOILUTSequence")):
        return values, arr, False
    try:
        linear = _linear_window(arr, ds)
    except _MALFORMED:  # a damaged window element (pydicom parses lazily): pydicom's own path notes it below
        linear = None
    if linear is not None:
        return values, linear, True
    try:
        windowed = apply_voi_lut(arr, ds)
    except _MALFORMED as exc:
        notes.append(f"window / VOI LUT ignored (malformed: {exc})")
        return values, arr, False
    if not np.all(np.isfinite(np.asarray(windowed, dtype=np.float64))):
        notes.append("window / VOI LUT ignored (it gives non-finite values)")
        return values, arr, False
    return values, windowed, True


def _linear_window(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """The DICOM LINEAR window (PS3.3 C.11.2.1.2.1, the first window of a multi-valued element) in
    float32, ramping from 0 to 1: pydicom's ``apply_voi_lut`` computes the same ramp in float64 scaled to
    the output bit range, which the min-max normalisation that follows removes, at 10x the time. None
    (use pydicom) for a VOI LUT, the SIGMOID / LINEAR_EXACT functions and any window that is not two
    finite numbers with width >= 1, so pydicom's checks and messages still apply to those. Raises
    ``_MALFORMED`` errors for window elements pydicom cannot parse."""
    from pydicom.multival import MultiValue

    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if "VOILUTSequence" in ds or function != "LINEAR" or "WindowWidth" not in ds:
        return None
    values = [ds.get("WindowCenter"), ds.get("WindowWidth")]
    try:
        center, width = (float(v[0] if isinstance(v, (MultiValue, list, tuple)) else v) for v in values)
    except _MALFORMED:
        return None
    if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
        return None
    center, width = center - 0.5, width - 1  # the standard's half-pixel convention
    x = arr.astype(np.float32)
    if width == 0:  # a step at the centre
        return (x > center).astype(np.float32)
    x -= np.float32(center)
    x *= np.float32(1 / width)
    x += np.float32(0.5)
    return np.clip(x, 0, 1, out=x)


def _first_frame(ds: Any) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=0)


def _clean(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text.upper() or None
