"""Seeds and mutators for the fuzz tests (tests/test_fuzz.py) and the regression corpus (tests/corpus/).

Seeds are small re-encodings of real files from ../shared/data (a chest film as 8- and 16-bit PNG, baseline
and progressive JPEG, DICOM uncompressed / RLE / JPEG 2000), so that every mutation starts from a file the
decoder accepts and stays fast. Mutators are deterministic functions of their arguments: hypothesis draws
the arguments, and a failing example can be written to the corpus as the bytes it produced.
"""

from __future__ import annotations

import logging
import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from medai.data.io import DecodedImage, ImageDecodeError, decode_image

SIDE = 64  # seeds are SIDE x SIDE: big enough for the decoder's 16-pixel minimum, small enough to be fast


def _chest(data: Path) -> np.ndarray:
    """A real chest film (NIH PNG, 1024 px) downscaled to SIDE x SIDE, as float in [0, 1]."""
    png = sorted((data / "nih-cxr14-sample" / "fullres").glob("*.png"))[0]
    with Image.open(png) as img:
        small = img.convert("L").resize((SIDE, SIDE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _dicom(data: Path, pixels: np.ndarray, syntax: str) -> bytes:
    """The real SIIM chest DICOM's header around ``pixels`` (uint16), in the given transfer syntax."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(data / "dicom" / "siim_cxr_pa_mono2.dcm")
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == "jpeg":  # JPEG baseline (8-bit): Pillow's encoder, encapsulated as a modality would
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEGBaseline8Bit

        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PhotometricInterpretation, ds.WindowCenter, ds.WindowWidth = "MONOCHROME2", 128, 256
        frame = _encode(Image.fromarray(np.round(pixels / pixels.max() * 255).astype(np.uint8)), "JPEG", quality=90)
        ds.PixelData, ds.file_meta.TransferSyntaxUID = encapsulate([frame]), JPEGBaseline8Bit
        ds["PixelData"].is_undefined_length, ds["PixelData"].VR = True, "OB"
    elif syntax != "explicit":
        from pydicom.uid import JPEG2000Lossless, RLELossless
        ds.compress({"rle": RLELossless, "j2k": JPEG2000Lossless}[syntax], encoding_plugin="pylibjpeg"
                    if syntax == "j2k" else "")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@lru_cache(maxsize=1)
def seeds(data: Path) -> dict[str, bytes]:
    """name -> bytes of every seed file (cached per data folder)."""
    chest = _chest(data)
    img8 = Image.fromarray(np.round(chest * 255).astype(np.uint8))
    img16 = Image.fromarray(np.round(chest * 4095).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    out = {
        "png8": _encode(img8, "PNG"),
        "png16": _encode(img16, "PNG"),
        "png_rgba": _encode(img8.convert("RGBA"), "PNG"),
        "jpeg": _encode(img8, "JPEG", quality=90),
        "jpeg_progressive_exif": _encode(img8, "JPEG", quality=90, progressive=True, exif=exif.tobytes()),
        "dicom_explicit": _dicom(data, chest * 4095, "explicit"),
        "dicom_rle": _dicom(data, chest * 4095, "rle"),
    }
    out["dicom_jpeg"] = _dicom(data, chest * 4095, "jpeg")
    try:
        out["dicom_j2k"] = _dicom(data, chest * 4095, "j2k")
    except Exception:  # noqa: BLE001 - no JPEG 2000 encoder installed: fuzz the other seeds
        pass
    return out


# --------------------------------------------------------------------------------------------------
# Byte-level mutators (any format)

def flip_bytes(data: bytes, positions: list[int], values: list[int]) -> bytes:
    """Overwrite bytes at ``positions`` (taken modulo the length) with ``values``."""
    buf = bytearray(data)
    for pos, val in zip(positions, values):
        buf[pos % len(buf)] = val & 0xFF
    return bytes(buf)


def flip_bits(data: bytes, seed: int, attempt: int, tail: int) -> bytes:
    """The ``attempt``-th of a seeded series of mutations that flip 1, 8 or 64 random bits in the last
    ``tail`` bytes (where a DICOM's compressed pixel data lies)."""
    import random

    rng = random.Random(seed)
    for _ in range(attempt):
        buf = bytearray(data)
        for _ in range(rng.choice([1, 8, 64])):
            j = rng.randrange(len(buf) - tail, len(buf))
            buf[j] ^= 1 << rng.randrange(8)
    return bytes(buf)


def truncate(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def splice(data: bytes, at: float, insert: bytes, remove: int = 0) -> bytes:
    """Insert ``insert`` at a relative position, removing ``remove`` bytes there."""
    pos = int(len(data) * at)
    return data[:pos] + insert + data[pos + remove:]


# --------------------------------------------------------------------------------------------------
# PNG structure: chunks with valid CRCs, so the mutation reaches the decoder instead of the CRC check

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def png_rebuild(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(k, b) for k, b in chunks)


def png_header(data: bytes, width: int, height: int, depth: int, colour: int, interlace: int = 0) -> bytes:
    """The PNG with its IHDR rewritten (any values, valid CRC)."""
    chunks = png_chunks(data)
    ihdr = struct.pack(">IIBBBBB", width & 0xFFFFFFFF, height & 0xFFFFFFFF, depth & 0xFF, colour & 0xFF, 0, 0,
                       interlace & 0xFF)
    return png_rebuild([(b"IHDR", ihdr)] + [c for c in chunks if c[0] != b"IHDR"])


def png_extra_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """The PNG with one more chunk right after IHDR (text, ICC profile, unknown critical chunk...)."""
    chunks = png_chunks(data)
    return png_rebuild(chunks[:1] + [(kind, body)] + chunks[1:])


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose IDAT inflates to width x height bytes from a few KB: a real decompression bomb."""
    packer, row = zlib.compressobj(9), b"\0" * (width + 1)  # row by row: the test itself stays small
    raw = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return png_rebuild([(b"IHDR", ihdr), (b"IDAT", raw), (b"IEND", b"")])


# --------------------------------------------------------------------------------------------------
# JPEG structure

def jpeg_frame_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF marker's size fields rewritten."""
    buf = bytearray(data)
    pos = 2
    while pos + 4 <= len(buf) and buf[pos] == 0xFF:
        marker = buf[pos + 1]
        length = struct.unpack(">H", buf[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            buf[pos + 5:pos + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
            break
        pos += 2 + length
    return bytes(buf)


# --------------------------------------------------------------------------------------------------
# DICOM structure: rewrite elements through pydicom, keeping the file well formed around them

DICOM_FIELDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "PlanarConfiguration",
                "WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "BodyPartExamined",
                "ViewPosition", "TransferSyntaxUID", "PixelData")


def _save(ds: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_set(data: bytes, field: str, value: object) -> bytes:
    """The DICOM with one element set to ``value`` (as raw bytes when its type does not fit the VR)."""
    import pydicom
    from pydicom.dataelem import RawDataElement

    if field == "TransferSyntaxUID":  # patched in the bytes: pydicom will not write a mismatched syntax
        return dicom_transfer_syntax(data, value if isinstance(value, bytes) else str(value).encode("latin-1",
                                                                                                    "replace"))
    ds = pydicom.dcmread(io.BytesIO(data))
    if field == "PixelData":
        raw = value if isinstance(value, bytes) else bytes(str(value), "latin-1", "replace")
        if ds.file_meta.TransferSyntaxUID.is_compressed:  # garbage frames, wrapped as the syntax requires
            from pydicom.encaps import encapsulate
            raw = encapsulate([raw + b"\0" * (len(raw) % 2)])
        ds.PixelData = raw
        return _save(ds)
    tag = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(field))
    try:
        setattr(ds, field, value)
        return _save(ds)
    except Exception:  # noqa: BLE001 - store the raw bytes unconverted: what a broken modality might write
        ds = pydicom.dcmread(io.BytesIO(data))
        raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(raw), raw, 0, False, True)
        return _save(ds)


def dicom_transfer_syntax(data: bytes, uid: bytes) -> bytes:
    """The file with its (0002,0010) Transfer Syntax UID value replaced, the pixel data left as it was."""
    at = data.index(b"\x02\x00\x10\x00UI", 132)
    length = struct.unpack("<H", data[at + 6:at + 8])[0]
    uid = uid[:64] + b"\0" * (len(uid[:64]) % 2)
    return data[:at + 6] + struct.pack("<H", len(uid)) + uid + data[at + 8 + length:]


def dicom_private(data: bytes, size: int) -> bytes:
    """The DICOM with a private element of ``size`` bytes (huge metadata)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    block = ds.private_block(0x0011, "MEDAI FUZZ", create=True)
    block.add_new(0x01, "OB", b"\x00" * size)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# The property every decoder input must satisfy

def check_decoded(result: DecodedImage) -> None:
    p = result.pixels
    assert p.dtype == np.float32 and p.ndim == 2 and min(p.shape) >= 16
    assert np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0
    assert (result.meta.height, result.meta.width) == p.shape


class _Tracebacks(logging.Handler):
    """Collects log records that carry a traceback (a library logging its own failure)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def decode_or_specific_error(data: bytes) -> str:
    """'ok' or the ImageDecodeError subclass's name; anything else propagates and fails the test, and so
    does a traceback logged on the way (pydicom logs one per failed decoder plugin) or a message that
    shows Python internals (object reprs with memory addresses)."""
    catcher = _Tracebacks()
    root = logging.getLogger()
    root.addHandler(catcher)
    try:
        check_decoded(decode_image(data, name="fuzz.bin"))
        return "ok"
    except ImageDecodeError as exc:
        assert str(exc).startswith("fuzz.bin: ") and len(str(exc)) > 30, str(exc)  # names the file, says why
        assert " at 0x" not in str(exc) and "\n" not in str(exc), str(exc)
        return type(exc).__name__
    finally:
        root.removeHandler(catcher)
        assert not catcher.records, f"a traceback was logged: {catcher.records[0].getMessage()}"
