"""Heatmap overlays: a colormap blended onto the original image, optional anatomy contours, PNG out."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from medai.explain.anatomy import ChestAnatomy
from medai.imaging import resize_mask

# A perceptually ordered colormap (dark blue -> cyan -> yellow -> red), as RGB control points.
_STOPS = np.array([[0.0, 0, 0, 0.5], [0.25, 0, 0.6, 1], [0.5, 0.2, 1, 0.6], [0.75, 1, 0.9, 0], [1.0, 1, 0, 0]])
CONTOUR_COLOURS = {"right_lung": (255, 80, 80), "left_lung": (80, 160, 255), "heart": (80, 255, 120)}


def _colormap_lut(levels: int = 1024) -> np.ndarray:
    v = np.linspace(0, 1, levels)[:, None]
    out = np.zeros((levels, 3), dtype=np.float32)
    for (x0, *c0), (x1, *c1) in zip(_STOPS[:-1], _STOPS[1:]):
        t = np.clip((v - x0) / (x1 - x0), 0, 1)
        inside = (v >= x0) & (v <= x1)
        out = np.where(inside, np.array(c0) + t * (np.array(c1) - np.array(c0)), out)
    return out.astype(np.float32)


_LUT = _colormap_lut()  # 1024 levels: finer than the 8-bit output


def _levels(values: np.ndarray) -> np.ndarray:
    """[0, 1] array -> indices into the lookup table (NaN counts as 0)."""
    v = np.clip(values, 0, 1).astype(np.float32, copy=True)
    if np.isnan(v).any():
        np.nan_to_num(v, copy=False, nan=0.0)
    v *= len(_LUT) - 1
    v += 0.5
    return v.astype(np.intp)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask eroded by ``radius`` pixels along rows and columns (outside the image counts as empty):
    four shifted ANDs, all a contour of the filled anatomy masks needs."""
    inner = mask.copy()
    inner[radius:] &= mask[:-radius]
    inner[:-radius] &= mask[radius:]
    inner[:, radius:] &= mask[:, :-radius]
    inner[:, :-radius] &= mask[:, radius:]
    inner[:radius], inner[-radius:], inner[:, :radius], inner[:, -radius:] = False, False, False, False
    return inner


def render_overlay(pixels: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45,
                   anatomy: ChestAnatomy | None = None) -> np.ndarray:
    """uint8 RGB of the original image with the heatmap blended in (weighted by its own strength):
    each channel is image + alpha * (colour - image), alpha = opacity * heat, from per-level tables."""
    if heatmap.shape != pixels.shape:
        raise ValueError(f"heatmap {heatmap.shape} and image {pixels.shape} differ in shape")
    levels = _levels(heatmap)
    alpha = np.linspace(0, float(np.clip(opacity, 0, 1)), len(_LUT), dtype=np.float32).take(levels)
    base = np.clip(pixels, 0, 1).astype(np.float32) * 255
    out = np.empty(pixels.shape + (3,), dtype=np.uint8)
    for c in range(3):
        channel = (_LUT[:, c] * 255).take(levels)
        channel -= base
        channel *= alpha
        channel += base
        channel += 0.5
        out[..., c] = channel  # float -> uint8 truncates, so + 0.5 rounds
    if anatomy is not None and anatomy.applicable:
        width = max(1, round(max(pixels.shape) / 400))
        for name, colour in CONTOUR_COLOURS.items():
            mask = resize_mask(getattr(anatomy, name), pixels.shape)
            out[mask & ~_erode(mask, width)] = colour
    return out


def to_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
