"""One call that explains an image: heatmaps per finding, anatomy, attention shares and CTR (callers go
through :mod:`medai.analysis`, which adds the prediction)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medai.data.io import DecodedImage
from medai.explain.anatomy import (ChestAnatomy, attention_shares_of, ctr_summary, segment_chest,
                                   shortcut_warning)
from medai.explain.cam import compute_cams
from medai.imaging import resize_heatmap
from medai.models.registry import MedaiModel


class Heatmaps(Mapping[str, np.ndarray]):
    """Label -> heatmap at the original image resolution, in [0, 1]. The maps are kept at model size and
    each is resized on first access: a page shows one finding at a time, and the attention shares are
    computed at the anatomy's working size, so most full-size maps are never needed."""

    def __init__(self, small: dict[str, np.ndarray], size: tuple[int, int]):
        self.small, self.size = small, size
        self._full: dict[str, np.ndarray] = {}

    def __getitem__(self, label: str) -> np.ndarray:
        if label not in self._full:
            self._full[label] = resize_heatmap(self.small[label], self.size)
        return self._full[label]

    def at(self, label: str, size: tuple[int, int]) -> np.ndarray:
        """The label's heatmap at another size (a display size), from the model-size map."""
        return resize_heatmap(self.small[label], size)

    def __iter__(self) -> Iterator[str]:
        return iter(self.small)

    def __len__(self) -> int:
        return len(self.small)


@dataclass
class Explanation:
    labels: list[str]
    method: str
    heatmaps: Heatmaps  # label -> H x W in [0, 1], original resolution, resized on first access
    anatomy: ChestAnatomy
    logits: np.ndarray  # the forward pass the heatmaps come from
    probabilities: list[float] = field(default_factory=list)  # filled by the caller (medai.analysis)
    thresholds: dict[str, float] = field(default_factory=dict)
    shares: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)
    ctr: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "probabilities": dict(zip(self.labels, self.probabilities)),
            "thresholds": dict(self.thresholds),
            "explained": list(self.heatmaps),
            "anatomy": {"applicable": self.anatomy.applicable, "reason": self.anatomy.reason,
                        "confidence": self.anatomy.ctr_detail.get("confidence")},
            "attention_shares": self.shares, "shortcut_warnings": self.warnings,
            "cardiothoracic_ratio": self.ctr, "timings_s": self.timings,
        }


Targets = list[int] | Callable[[np.ndarray], list[int]]


def explain(model: MedaiModel, batch: torch.Tensor, image: DecodedImage, targets: Targets, method: str, *,
            labels: list[str], softmax: bool = False, model_body_part: str | None = None) -> Explanation:
    """Heatmaps of ``targets`` (class indices, or a function of the logits that picks them) for one
    preprocessed ``batch`` of ``image``, as pytorch-grad-cam takes them (a model, its input, the targets),
    plus the anatomy of ``image`` and where each heatmap falls on it. One forward pass: its logits are
    returned (``Explanation.logits``) and may give the prediction."""
    timings = {}
    t0 = time.perf_counter()
    cams = compute_cams(model, batch, targets, method, softmax=softmax)  # model-size maps
    timings["heatmaps"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if model_body_part and model_body_part.lower() != "chest" and not image.meta.body_part:
        anatomy = ChestAnatomy(False, "anatomy maps apply to chest X-rays; this model reads "
                                      f"{model_body_part} images")
    else:
        anatomy = segment_chest(image.pixels, image.meta.body_part, image.meta.view, image.meta.modality)
    timings["anatomy"] = time.perf_counter() - t0
    small = {labels[c]: heat for c, heat in cams.heatmaps.items()}  # in the order the targets chose
    result = Explanation(labels, method, Heatmaps(small, image.pixels.shape), anatomy, cams.logits,
                         ctr=ctr_summary(anatomy, image.meta.view), timings=timings)
    if anatomy.applicable and small:  # at model size: the shares are taken at the anatomy's size
        result.shares = attention_shares_of(small, anatomy)
        for label in small:
            warning = shortcut_warning(result.shares[label])
            if warning:
                result.warnings[label] = warning
    return result
