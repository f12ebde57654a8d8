"""One call that explains an image: probabilities, heatmaps per finding, anatomy shares and CTR."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medai.data.io import DecodedImage
from medai.data.transforms import preprocess
from medai.evaluation.calibration import probs_from_logits
from medai.explain.anatomy import (ChestAnatomy, attention_shares, ctr_summary, segment_chest,
                                   shortcut_warning)
from medai.explain.cam import ExplainError, compute_cams, default_method, resize_heatmap
from medai.inference import Predictor, findings_at


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
    probabilities: list[float]
    thresholds: dict[str, float]
    method: str
    heatmaps: Heatmaps  # label -> H x W in [0, 1], original resolution, resized on first access
    anatomy: ChestAnatomy
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


Findings = str | list[str] | Callable[[list[float]], list[str]]


def select_findings(predictor: Predictor, probabilities: list[float], findings: Findings) -> list[int]:
    """'all' = every label; 'positive' = those at or above threshold (the top one if none); names; or a
    function of the probabilities that returns names (a caller's own thresholds)."""
    labels = predictor.labels
    if callable(findings):
        findings = findings(probabilities)
    if findings == "all":
        return list(range(len(labels)))
    if findings == "positive":
        hits = [labels.index(lab) for lab in findings_at(labels, probabilities, predictor.thresholds)]
        candidates = [i for i, lab in enumerate(labels) if lab in predictor.thresholds] or list(range(len(labels)))
        return hits or [max(candidates, key=lambda i: probabilities[i])]
    unknown = [f for f in findings if f not in labels]
    if unknown:
        raise ExplainError(f"unknown findings {unknown}; this model knows {labels}")
    return [labels.index(f) for f in findings]


def explain(predictor: Predictor, image: DecodedImage, findings: Findings = "positive",
            method: str | None = None, probabilities: list[float] | None = None) -> Explanation:
    """``probabilities``: the predictor's output for ``image`` when the caller already has it. Without
    them, the heatmaps' own forward pass gives the prediction (``Explanation.probabilities``): one forward
    pass in all, which is how the API analyses with heatmaps."""
    method = method or default_method(predictor.ckpt.card["architecture"])
    timings = {}
    batch = preprocess(image.pixels, predictor.spec).unsqueeze(0)
    probs = list(probabilities) if probabilities is not None else []

    def pick(logits: np.ndarray) -> list[int]:
        if not probs:  # the prediction, from the same logits the heatmaps come from
            probs.extend(float(p) for p in probs_from_logits(logits[None], predictor.kind,
                                                             predictor.temperature)[0])
        return select_findings(predictor, probs, findings)
    t0 = time.perf_counter()
    cams = compute_cams(predictor.model, batch.to(predictor.device, memory_format=torch.channels_last), pick,
                        method, softmax=predictor.kind == "multiclass")  # model-size maps
    timings["heatmaps"] = time.perf_counter() - t0
    classes = list(cams.heatmaps)  # in the order pick() chose them
    t0 = time.perf_counter()
    model_part = predictor.ckpt.card.get("task", {}).get("body_part")
    if model_part and model_part.lower() != "chest" and not image.meta.body_part:
        anatomy = ChestAnatomy(False, f"anatomy maps apply to chest X-rays; this model reads {model_part} images")
    else:
        anatomy = segment_chest(image.pixels, image.meta.body_part, image.meta.view, image.meta.modality)
    timings["anatomy"] = time.perf_counter() - t0
    small = {predictor.labels[c]: cams.heatmaps[c] for c in classes}
    heatmaps = Heatmaps(small, image.pixels.shape)
    result = Explanation(predictor.labels, probs, predictor.thresholds, method, heatmaps, anatomy,
                         ctr=ctr_summary(anatomy, image.meta.view), timings=timings)
    if anatomy.applicable:
        for label, heat in small.items():  # at model size: the shares are taken at the anatomy's size
            result.shares[label] = attention_shares(heat, anatomy)
            warning = shortcut_warning(result.shares[label])
            if warning:
                result.warnings[label] = warning
    return result
