"""The decoder on real files and on damaged / hostile inputs."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medai.data.io import (CorruptImageError, DecodeLimits, DicomNoPixelDataError, ImageDecodeError,
                           ImageTooLargeError,
                           ImageTooSmallError, UnsupportedFormatError, decode_image, sniff_format)
from tests import fuzzing as F
from tests.conftest import need, run_cli


def lung_vs_mediastinum(p: np.ndarray) -> tuple[float, float]:
    """Mean intensity of both mid-lung fields and of the central mediastinum strip."""
    h, w = p.shape
    band = slice(h // 3, 2 * h // 3)
    lungs = np.concatenate([p[band, w // 8: w // 3].ravel(), p[band, 2 * w // 3: 7 * w // 8].ravel()])
    return float(lungs.mean()), float(p[band, 9 * w // 20: 11 * w // 20].mean())


def dicom_rows() -> list[dict]:
    with open(need("dicom/labels.csv")) as fh:
        return list(csv.DictReader(fh))


def test_every_real_dicom_decodes_to_unit_float():
    for row in dicom_rows():
        img = decode_image(need(f"dicom/{row['file']}"))
        assert img.pixels.dtype == np.float32
        assert img.pixels.shape == (int(row["rows"]), int(row["cols"]))
        assert 0.0 <= img.pixels.min() < 0.1 and 0.9 < img.pixels.max() <= 1.0
        assert img.meta.source_format == "dicom"
        assert img.meta.photometric == row["photometric"]
        assert img.meta.body_part == row["body_part"]


@pytest.mark.parametrize("center, width", [(None, None), (100, 1), (2, 2), ([550, 600], [1024, 50]),
                                           (-300.5, 7.25), (40000, 3)])
def test_linear_window_matches_pydicom(center, width):
    """The float32 LINEAR window gives pydicom's apply_voi_lut ramp (after the min-max normalisation that
    follows both); other VOI functions and malformed windows are left to pydicom."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from medai.data.dicom import _linear_window
    from medai.data.io import _minmax

    for row in dicom_rows():
        ds = pydicom.dcmread(need(f"dicom/{row['file']}"))
        if center is not None:
            ds.WindowCenter, ds.WindowWidth = center, width
        elif "WindowCenter" not in ds:
            continue
        arr = apply_modality_lut(ds.pixel_array, ds)
        ours = _minmax(_linear_window(arr, ds))
        np.testing.assert_allclose(ours, _minmax(np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)), atol=1e-6)
    ds.VOILUTFunction = "SIGMOID"
    assert _linear_window(arr, ds) is None
    ds.VOILUTFunction, ds.WindowWidth = "LINEAR", 0.5  # invalid: pydicom's check and message apply
    assert _linear_window(arr, ds) is None


def test_monochrome1_chest_has_dark_lungs_like_png_chest_xrays():
    png = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0]
    lung, mediastinum = lung_vs_mediastinum(decode_image(png).pixels)
    assert lung < mediastinum  # the PNG convention: lungs dark
    for name in ("pydicom_data_RG1_UNCR.dcm", "pydicom_data_RG1_J2KR.dcm"):
        lung, mediastinum = lung_vs_mediastinum(decode_image(need(f"dicom/{name}")).pixels)
        assert lung < mediastinum - 0.1, name


def test_monochrome1_label_inverts_the_same_pixels():
    normal = decode_image(need("dicom/siim_cxr_pa_mono2.dcm")).pixels
    flagged = decode_image(need("dicom/txv_fake_monochrome1_cxr_pa.dcm")).pixels
    np.testing.assert_allclose(flagged, 1.0 - normal, atol=1e-6)


def test_jpeg2000_lossless_equals_uncompressed():
    a = decode_image(need("dicom/pydicom_data_RG1_UNCR.dcm")).pixels
    b = decode_image(need("dicom/pydicom_data_RG1_J2KR.dcm")).pixels
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_dicom_metadata_carries_no_patient_tags():
    path = need("dicom/pydicom_data_RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    meta = decode_image(path).meta.to_dict()
    text = repr(meta)
    for tag in ("PatientName", "PatientID", "PatientBirthDate"):
        value = str(ds.get(tag, "") or "")
        if value:
            assert value not in text


def test_type_is_sniffed_from_content_not_name(tmp_path: Path):
    jpeg = sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[0]
    disguised = tmp_path / "scan.png"
    disguised.write_bytes(jpeg.read_bytes())
    img = decode_image(disguised)
    assert img.meta.source_format == "jpeg"
    np.testing.assert_array_equal(img.pixels, decode_image(jpeg).pixels)
    assert sniff_format(b"hello world") is None


def test_sixteen_bit_png_keeps_its_depth(tmp_path: Path):
    src = decode_image(need("dicom/pydicom_data_RG1_UNCR.dcm")).pixels[::4, ::4]
    as16 = np.round(src * 65535).astype(np.uint16)
    path = tmp_path / "cxr16.png"
    Image.fromarray(as16).save(path)
    img = decode_image(path)
    assert img.meta.bits == 16
    np.testing.assert_allclose(img.pixels, as16 / 65535.0, atol=1e-6)
    assert len(np.unique(img.pixels)) > 256  # more levels than 8 bits could hold


def test_truncated_png_is_corrupt(tmp_path: Path):
    data = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0].read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match="damaged or truncated"):
        decode_image(bad)


def test_text_file_named_png_is_unsupported(tmp_path: Path):
    bad = tmp_path / "notes.png"
    bad.write_text("patient notes, not an image\n" * 20)
    with pytest.raises(UnsupportedFormatError, match="not a PNG, JPEG or DICOM"):
        decode_image(bad)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with one tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40000, 40000))
    with pytest.raises(ImageTooLargeError, match="1,600,000,000 pixels is above the limit"):
        decode_image(bomb)


def test_tiny_image_and_oversized_file_are_refused(tmp_path: Path):
    small = tmp_path / "small.png"
    Image.new("L", (8, 8)).save(small)
    with pytest.raises(ImageTooSmallError):
        decode_image(small)
    real = need("dicom/siim_cxr_pa_mono2.dcm")
    with pytest.raises(ImageTooLargeError, match="MB"):
        decode_image(real, DecodeLimits(max_file_bytes=10_000))


def test_dicom_without_pixel_data(tmp_path: Path):
    ds = pydicom.dcmread(need("dicom/siim_cxr_pa_mono2.dcm"))
    del ds.PixelData
    path = tmp_path / "report.dcm"
    ds.save_as(path)
    with pytest.raises(DicomNoPixelDataError, match="no image"):
        decode_image(path)


def test_corrupt_dicom_pixel_data(tmp_path: Path):
    data = bytearray(need("dicom/pydicom_data_RG1_J2KR.dcm").read_bytes())
    path = tmp_path / "broken.dcm"
    path.write_bytes(bytes(data[: len(data) * 9 // 10]))  # pixel data element cut short
    with pytest.raises(CorruptImageError):
        decode_image(path)


def test_rgb_png_becomes_grayscale():
    jpeg = sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[0]
    gray = decode_image(jpeg).pixels
    buf = io.BytesIO()
    Image.fromarray((gray * 255).round().astype(np.uint8)).convert("RGB").save(buf, format="PNG")
    rgb = decode_image(buf.getvalue(), name="rgb.png")
    assert rgb.pixels.ndim == 2
    np.testing.assert_allclose(rgb.pixels, gray, atol=1 / 255 + 1e-6)


def test_cli_reports_bad_inputs_without_traceback(tmp_path: Path):
    import torch

    from medai.models import create_model
    from medai.models.checkpoint import new_card, save_checkpoint

    torch.manual_seed(0)
    model = create_model("hybrid_cnn_transformer", 2, image_size=32, d_model=32, num_heads=2, num_layers=1)
    ckpt = save_checkpoint(model, new_card("hybrid_cnn_transformer", {"image_size": 32, "d_model": 32,
                                                                       "num_heads": 2, "num_layers": 1},
                                           "multiclass", ["a", "b"], {"image_size": 32, "mean": 0.5, "std": 0.25}),
                           tmp_path / "m.safetensors")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40000, 40000))
    data = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    for bad, message in ((text, "not a PNG, JPEG or DICOM"), (bomb, "decompression bomb"), (cut, "truncated")):
        proc = run_cli("predict", "--checkpoint", str(ckpt), str(bad))
        assert proc.returncode == 2
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


def tiny_checkpoint(tmp_path: Path) -> Path:
    import torch

    from medai.models import create_model
    from medai.models.checkpoint import new_card, save_checkpoint

    torch.manual_seed(0)
    kwargs = {"image_size": 32, "d_model": 32, "num_heads": 2, "num_layers": 1}
    return save_checkpoint(create_model("hybrid_cnn_transformer", 2, **kwargs),
                           new_card("hybrid_cnn_transformer", kwargs, "multiclass", ["a", "b"],
                                    {"image_size": 32, "mean": 0.5, "std": 0.25}), tmp_path / "m.safetensors")


def test_messages_name_the_problem_not_python_internals(tmp_path: Path):
    """A PNG cut after its signature made PIL say 'cannot identify image file <_io.BytesIO object at 0x...>'."""
    data = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0].read_bytes()
    with pytest.raises(CorruptImageError) as caught:
        decode_image(data[:40], name="cut.png")
    assert "cut.png" in str(caught.value) and "cannot identify image file" in str(caught.value)
    assert "0x" not in str(caught.value) and "BytesIO" not in str(caught.value)


def test_only_regular_files_are_read(tmp_path: Path):
    """A folder, /dev/zero (size 0, endless) and a FIFO (would block) are refused before reading."""
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path, message in ((tmp_path, "is a folder"), (Path("/dev/zero"), "is a device"),
                          (fifo, "is a FIFO")):
        with pytest.raises(ImageDecodeError, match=message):
            decode_image(path)


def test_cli_keeps_good_results_and_reports_each_bad_argument(tmp_path: Path):
    """A folder, /dev/zero, a FIFO and a bit-flipped compressed DICOM among the arguments: one clear
    line each, the good file's result still printed, exit code 2, no traceback."""
    import json
    import os

    ckpt = tiny_checkpoint(tmp_path)
    good = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    flipped = tmp_path / "flipped.dcm"
    flipped.write_bytes(F.flip_bits((need("dicom") / "siim_cxr_pa_mono2.dcm").read_bytes(), seed=1, attempt=16,
                                   tail=120_000))
    proc = run_cli("predict", "--checkpoint", str(ckpt), str(good), str(tmp_path), "/dev/zero", str(fifo),
                   str(flipped), "--json", timeout=120)
    assert proc.returncode == 2
    results = json.loads(proc.stdout)
    assert [r["file"] for r in results if "error" not in r] == [str(good)]
    assert set(results[0]["probabilities"]) == {"a", "b"}
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, proc.stderr
    for expected in ("is a folder", "is a device", "is a FIFO", "flipped.dcm: the DICOM pixel data cannot be decoded"):
        assert any(expected in line for line in errors), (expected, errors)
    assert "Traceback" not in proc.stderr and "0x" not in proc.stderr
