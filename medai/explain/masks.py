"""Binary-mask helpers shared by the classical (``anatomy.py``) and learned (``segmentation.py``) anatomy."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (``mask`` itself when it has at most one)."""
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes``: background not 4-connected to the border is a hole. One labelling
    instead of scipy's dilation repeated until nothing changes (3-4x faster at 256 px)."""
    labels, n = ndi.label(~mask)
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]
