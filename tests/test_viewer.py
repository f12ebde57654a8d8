"""The viewer: window/level in the image's own units (real DICOMs, a CT the test builds, a JPEG) and the
viewer page (panes, escaping, full resolution)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from medai.data.io import decode_image
from medai.display import FULL_RANGE, Window, image_scale
from medai.ui.viewer import MAX_SIDE, full_resolution, viewer_html
from tests.conftest import need


def test_a_dicom_is_windowed_in_its_stored_units_and_its_own_window_is_the_default():
    image = decode_image(need("dicom/pydicom_data_RG1_UNCR.dcm"))  # CR, MONOCHROME1, 15 bits, C 15000 / W 30000
    scale = image_scale(image)
    assert scale.unit == "stored value" and (scale.low, scale.high) == (874.0, 26479.0) and scale.step == 1.0
    assert scale.dark_is_high
    default_name, default = next(iter(scale.presets.items()))
    assert default_name.startswith("File window 1") and default == Window(15000.0, 30000.0)
    # the file's window shows what the model reads (the decoder applies the same window, then min-max)
    shown = scale.window_u8(default).astype(np.float32)
    assert np.corrcoef(shown.ravel()[::97], image.pixels.ravel()[::97])[0, 1] > 0.9999
    # MONOCHROME1: high values are dark; invert turns that round
    high_value = image.values == image.values.max()
    assert scale.window_u8(default)[high_value].max() < 40 and scale.window_u8(default, invert=True)[high_value].min() > 215
    # film presets: the lung window sits on the darker values' side (high, for MONOCHROME1), bone on the other
    lung, bone = (v for k, v in scale.presets.items() if k.startswith(("Lung", "Bone")))
    assert lung.center > bone.center and all(v.width >= 1 for v in scale.presets.values())


def test_ct_values_are_hounsfield_units_with_the_standard_windows():
    import pydicom

    ds = pydicom.dcmread(need("dicom/siim_cxr_pa_mono2.dcm"))
    ds.decompress()
    hu = np.tile(np.array([-1000, -600, 40, 240, 1000], dtype=np.int16), (64, 13))[:, :64]
    ds.Modality, ds.Rows, ds.Columns = "CT", *hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    scale = image_scale(decode_image(buf.getvalue()))
    assert scale.unit == "HU" and (scale.low, scale.high) == (-1000.0, 1000.0) and not scale.dark_is_high
    assert scale.presets["Mediastinum (HU)"] == Window(40.0, 400.0)
    mediastinum = scale.window_u8(scale.presets["Mediastinum (HU)"])
    assert mediastinum[hu == 40].tolist()[0] in (127, 128) and mediastinum[hu == -600].max() == 0
    assert mediastinum[hu == 240].min() == 255
    assert scale.window_u8(scale.presets["Lung (HU)"])[hu == -600].tolist()[0] in (127, 128)


def test_a_colour_dicom_is_decoded_and_windowed_in_grey_levels():
    """A colour (RGB) DICOM has no stored grey values: it decodes, and the viewer uses its grey levels."""
    import pydicom

    ds = pydicom.dcmread(need("dicom/siim_cxr_pa_mono2.dcm"))
    ds.decompress()
    grey = ds.pixel_array.astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    image = decode_image(buf.getvalue())
    assert image.values is None and image.pixels.shape == grey.shape
    scale = image_scale(image)
    assert scale.unit == "grey level" and scale.high == 255.0 and not scale.dark_is_high


def test_a_jpeg_is_windowed_in_grey_levels():
    image = decode_image(sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[0])
    scale = image_scale(image)
    assert scale.unit == "grey level" and scale.values.dtype == np.uint8 and not scale.dark_is_high
    full = scale.presets[FULL_RANGE]
    assert (full.low, full.high) == (scale.low, scale.high)
    np.testing.assert_allclose(scale.window_u8(Window(127.5, 255.0)), np.round(image.pixels * 255), atol=1)
    assert scale.clamp(Window(1e6, 1e6)) == Window(scale.high, 2 * (scale.high - scale.low))


def _pane_images(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in
            re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_viewer_page_holds_the_panes_at_their_resolution_and_escapes_captions():
    film = np.arange(300 * 200, dtype=np.uint32).reshape(300, 200).astype(np.uint8)
    heat = np.zeros((150, 100, 3), dtype=np.uint8)
    page = viewer_html([("Image", film), ('gradcam heatmap for <img src=x onerror="alert(1)">', heat)], (200, 300),
                       "abc", note="</script><b>x</b>")
    images = _pane_images(page)
    assert [i.shape for i in images] == [(300, 200), (150, 100, 3)] and np.array_equal(images[0], film)
    assert '<img src=x onerror' not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "</script><b>" not in page
    assert '"w": 200, "h": 300, "key": "medai-view-abc"' in page and page.count('class="pane"') == 2


def test_films_are_sent_at_full_resolution_up_to_the_cap():
    film = np.zeros((1955, 1841), dtype=np.uint8)
    assert full_resolution(film) is film
    big = full_resolution(np.zeros((MAX_SIDE * 2, MAX_SIDE), dtype=np.uint8))
    assert big.shape == (MAX_SIDE, MAX_SIDE // 2)
