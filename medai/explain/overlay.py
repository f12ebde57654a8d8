"""Heatmap overlays: a colormap blended onto the original image, optional anatomy contours, PNG out."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from medai.explain.anatomy import ChestAnatomy, mask_at

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


_LUT = _colormap_lut()


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] array -> float RGB in [0, 1] (a 1024-level lookup table: finer than 8-bit output)."""
    index = (np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(_LUT) - 1) + 0.5).astype(np.intp)
    return _LUT[index]


def render_overlay(pixels: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45,
                   anatomy: ChestAnatomy | None = None) -> np.ndarray:
    """uint8 RGB of the original image with the heatmap blended in (weighted by its own strength)."""
    if heatmap.shape != pixels.shape:
        raise ValueError(f"heatmap {heatmap.shape} and image {pixels.shape} differ in shape")
    base = np.repeat(np.clip(pixels, 0, 1)[..., None], 3, axis=-1)
    alpha = float(np.clip(opacity, 0, 1)) * np.clip(heatmap, 0, 1)[..., None]
    rgb = base * (1 - alpha) + colormap(heatmap) * alpha
    out = (rgb * 255 + 0.5).astype(np.uint8)
    if anatomy is not None and anatomy.applicable:
        width = max(1, round(max(pixels.shape) / 400))
        for name, colour in CONTOUR_COLOURS.items():
            mask = mask_at(getattr(anatomy, name), pixels.shape)
            edge = mask & ~ndi.binary_erosion(mask, iterations=width)
            out[edge] = colour
    return out


def to_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
