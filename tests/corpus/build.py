"""Rebuild the decoder regression corpus: ``python -m tests.corpus.build`` (needs ../shared/data).

Each case is a minimized input that broke the decoder during fuzzing (marked *found*) or a classic hostile
input; it is derived deterministically from the small real seeds in tests/fuzzing.py. The expected
outcome of each file is written to expected.json after a human has checked it: 'ok' or the specific
ImageDecodeError subclass. tests/test_fuzz.py replays the files and compares.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from tests import fuzzing as F
from tests.fuzzing import decode_or_specific_error
from tests.conftest import DATA

HERE = Path(__file__).parent


def explicit_vr_offset(data: bytes, group: int, element: int) -> int:
    """Offset of an explicit-VR little-endian element's tag in a DICOM file."""
    return data.index(struct.pack("<HH", group, element), 132)


def cases() -> dict[str, bytes]:
    s = F.seeds(DATA)
    dcm = s["dicom_explicit"]
    ww = explicit_vr_offset(dcm, 0x0028, 0x1051)
    rows = explicit_vr_offset(dcm, 0x0028, 0x0010)
    return {
        # found: pydicom refuses a window width < 1 inside apply_voi_lut (was a raw ValueError)
        "found-dicom-window-width-zero.dcm": F.dicom_set(dcm, "WindowWidth", 0),
        # found: windowing a file that calls itself RGB with one sample (was a raw ValueError)
        "found-dicom-window-on-rgb-label.dcm": F.dicom_set(dcm, "PhotometricInterpretation", "RGB"),
        # found: a non-numeric window centre compared with ints (was a raw TypeError)
        "found-dicom-window-center-text.dcm": F.dicom_set(dcm, "WindowCenter", "abc"),
        # found: Rows holding two values; int() on a MultiValue (was a raw TypeError)
        "found-dicom-rows-multivalue.dcm": F.dicom_set(dcm, "Rows", "3\\4"),
        # found: an unknown VR in an element read lazily after dcmread (was NotImplementedError)
        "found-dicom-unknown-vr.dcm": F.flip_bytes(dcm, [ww + 4, ww + 5], [0x44, 0xDA]),
        # a file cut inside an element header: pydicom stops silently, so the missing pixels must be explained
        "dicom-short-element-header.dcm": dcm[:rows + 3],
        # a US element whose length is not a multiple of 2: the rest of the header desynchronises
        "dicom-odd-length-us.dcm": F.flip_bytes(dcm, [rows + 6], [3]),
        "dicom-no-pixel-data.dcm": F.dicom_set(dcm, "PixelData", b""),
        "dicom-claims-65535-rows.dcm": F.dicom_set(dcm, "Rows", 65535),
        "dicom-wrong-transfer-syntax.dcm": F.dicom_set(s["dicom_rle"], "TransferSyntaxUID", "1.2.840.10008.1.2.4.50"),
        "dicom-unknown-transfer-syntax.dcm": F.dicom_set(dcm, "TransferSyntaxUID", "1.2.3.4.5.6"),
        "dicom-bits-allocated-7.dcm": F.dicom_set(dcm, "BitsAllocated", 7),
        "dicom-truncated-pixels.dcm": F.truncate(dcm, 0.7),
        "dicom-j2k-zeroed-codestream.dcm": F.flip_bytes(s["dicom_j2k"], list(range(len(s["dicom_j2k"]) - 800,
                                                                                    len(s["dicom_j2k"]) - 780)), [0] * 20),
        # found: bits flipped in a JPEG-baseline DICOM's compressed pixels: Pillow's 'broken data stream',
        # and pydicom logged a traceback for each failed plugin (and the message ran over several lines)
        "found-dicom-jpeg-broken-stream.dcm": F.flip_bits(s["dicom_jpeg"], seed=1, attempt=12, tail=1700),
        "png-ihdr-2g-by-2g.png": F.png_header(s["png8"], 2**31 - 1, 2**31 - 1, 8, 0),
        "png-ihdr-20000-square-tiny-idat.png": F.png_header(s["png8"], 20_000, 20_000, 8, 0),
        "png-ihdr-bit-depth-3.png": F.png_header(s["png8"], 64, 64, 3, 0),
        "png-truncated.png": F.truncate(s["png8"], 0.5),
        "png-text-chunk-garbage.png": F.png_extra_chunk(s["png8"], b"zTXt", b"\xff" * 64),
        "png-unknown-critical-chunk.png": F.png_extra_chunk(s["png8"], b"ABCD", b"x" * 16),
        "jpeg-sof-zero-size.jpg": F.jpeg_frame_size(s["jpeg"], 0, 0),
        "jpeg-sof-65535-square.jpg": F.jpeg_frame_size(s["jpeg"], 65535, 65535),
        "jpeg-truncated-progressive.jpg": F.truncate(s["jpeg_progressive_exif"], 0.4),
        "jpeg-exif-garbage.jpg": F.flip_bytes(s["jpeg_progressive_exif"], list(range(24, 60)), [0xFF] * 36),
        "text-named-like-image.png": b"patient notes, not an image\n" * 4,
        "empty.dcm": b"",
    }


def main() -> int:
    folder = HERE / "decoder"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    expected = {}
    for name, data in sorted(cases().items()):
        (folder / name).write_bytes(data)
        expected[name] = decode_or_specific_error(data)
        print(f"{expected[name]:24s} {len(data):7d} B  {name}")
    (HERE / "expected.json").write_text(json.dumps({"decoder": expected}, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
