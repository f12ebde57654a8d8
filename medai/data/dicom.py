"""DICOM decoding for :func:`medai.data.io.decode_image`: pixel data (any transfer syntax pydicom can
decode, first frame of a multi-frame), the modality and VOI LUTs or windows the file carries, and the facts a
reader and the input gate need (modality, body part, view, units, windows). Patient and study fields go to
``DecodedImage.study`` only, never to the metadata; every failure is an ``ImageDecodeError`` naming the file.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from typing import Any

import numpy as np

from medai.data.io import (CorruptImageError, DecodedImage, DecodeLimits, DicomNoPixelDataError, ImageDecodeError,
                           ImageMeta, _check_size, _minmax, reason)


class _NoTraceback(logging.Filter):
    """pydicom logs every decoder plugin that fails, with its traceback, before it raises; the error this
    module raises names the file and the cause, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_NoTraceback())


def decode_dicom(data: bytes, label: str, limits: DecodeLimits) -> DecodedImage:
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
