"""Window/level in the image's own units: what a reader adjusts to look at a film, apart from what the
model reads (``DecodedImage.pixels``). DICOM: the modality-rescaled values (HU for CT) with the file's
own windows and presets; PNG/JPEG: grey levels 0-255."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medai.data.io import DecodedImage

# Standard CT windows in HU (centre, width): used only when the values are Hounsfield units.
CT_PRESETS = {"Lung (HU)": (-600.0, 1500.0), "Mediastinum (HU)": (40.0, 400.0), "Bone (HU)": (400.0, 1800.0)}
# Radiographs have no absolute scale: presets span brightness percentiles of the film itself, from dark
# (lungs) to bright (bone), whatever way round the file stores its values.
FILM_PRESETS = {"Lung (darker range of this film)": (2.0, 65.0),
                "Mediastinum (brighter range of this film)": (45.0, 99.5),
                "Bone (brightest range of this film)": (75.0, 99.9)}
FULL_RANGE = "Full range"


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


@dataclass
class ImageScale:
    """An image in its own units and how a viewer may window it."""

    values: np.ndarray  # HxW, in ``unit``
    unit: str  # "HU", "stored value", "grey level"...
    low: float  # the values' range
    high: float
    step: float  # the slider step that resolves the values
    dark_is_high: bool  # MONOCHROME1: high values are shown dark
    presets: dict[str, Window]  # the first is the default (the file's window, else the full range)

    def window_u8(self, window: Window, invert: bool = False) -> np.ndarray:
        """uint8 grey levels of ``window`` over the values (dark = low brightness on screen)."""
        out = self.values.astype(np.float32)
        out -= np.float32(window.low)
        out *= np.float32(1 / max(window.width, 1e-6))
        np.clip(out, 0, 1, out=out)
        if self.dark_is_high != invert:
            np.subtract(1, out, out=out)
        out *= 255
        out += 0.5
        return out.astype(np.uint8)

    def clamp(self, window: Window) -> Window:
        """A window the sliders can show: the centre inside the range, the width at most twice it."""
        span = max(self.high - self.low, self.step)
        return Window(float(np.clip(window.center, self.low, self.high)),
                      float(np.clip(window.width, self.step, 2 * span)))


def image_scale(image: DecodedImage) -> ImageScale:
    units = image.meta.extra.get("units") or {}
    if image.values is not None:
        values, unit, dark_is_high = image.values, str(units.get("name") or "stored value"), bool(units.get("monochrome1"))
    else:  # PNG/JPEG (or colour DICOM): the decoded grey levels
        values, unit, dark_is_high = np.round(image.pixels * 255).astype(np.uint8), "grey level", False
    low, high = float(values.min()), float(values.max())
    integral = values.dtype.kind in "iu"
    step = 1.0 if integral and high - low >= 50 else max((high - low) / 1000, 1e-6)
    presets: dict[str, Window] = {}
    for i, w in enumerate(units.get("windows") or []):
        name = str(w.get("name") or "").strip()
        presets[f"File window {i + 1}{': ' + name if name else ''} (C {w['center']:g} / W {w['width']:g})"] = \
            Window(float(w["center"]), float(w["width"]))
    presets[FULL_RANGE] = Window((low + high) / 2, max(high - low, step))
    if unit.upper() == "HU":
        presets.update({k: Window(*v) for k, v in CT_PRESETS.items()})
    else:
        sample = values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)].astype(np.float32)
        for name, (dark, bright) in FILM_PRESETS.items():
            if dark_is_high:  # brightness percentile q is value percentile 100 - q
                dark, bright = 100 - bright, 100 - dark
            lo, hi = (float(v) for v in np.percentile(sample, [dark, bright]))
            presets[name] = Window((lo + hi) / 2, max(hi - lo, step))
    return ImageScale(values, unit, low, high, step, dark_is_high, presets)
