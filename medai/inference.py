"""Predictor: checkpoint -> preprocess (from the card) -> logits -> calibrated probabilities, and the one
:func:`decide` that turns probabilities and thresholds into findings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medai.data.io import DecodedImage, DecodeLimits, DEFAULT_LIMITS, decode_image
from medai.data.transforms import PreprocessSpec, preprocess
from medai.evaluation.calibration import probs_from_logits
from medai.models.checkpoint import LoadedCheckpoint, load_checkpoint


# A multiclass model's class that means "nothing found": never a finding, never given a threshold. A
# two-class softmax model (NORMAL vs PNEUMONIA) thus makes one decision.
NEGATIVE_LABELS = {"normal", "no finding", "no_finding", "notumor", "no tumor", "no_tumor", "negative", "healthy"}


def negative_label(card: dict[str, Any]) -> str | None:
    """The card's ``negative_label``, else a multiclass label that names the absence of findings."""
    if card.get("negative_label"):
        return str(card["negative_label"])
    if card.get("task", {}).get("kind") != "multiclass":
        return None
    return next((lab for lab in card["labels"] if lab.strip().lower() in NEGATIVE_LABELS), None)


BORDERLINE_MARGIN = 0.10


def confidence_band(probability: float, threshold: float) -> str:
    """The model's output relative to the operating threshold, in words."""
    margin = probability - threshold
    if abs(margin) < BORDERLINE_MARGIN:
        return "borderline"
    if margin > 0:
        return "likely" if margin < 0.3 else "very likely"
    return "unlikely" if -margin < 0.3 else "very unlikely"


def decide(labels: list[str], probabilities: list[float], thresholds: dict[str, float],
           model_thresholds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The one decision: one row per finding (a label with a threshold: a negative class such as NORMAL is
    none), positives first (most probable first), then the rest by probability. Each row says whether its
    threshold is the model's operating point or the reader's own, with the model's value beside it."""
    model_thresholds = model_thresholds or thresholds
    rows = []
    for lab, p in zip(labels, probabilities):
        if lab not in thresholds:
            continue
        t, m = float(thresholds[lab]), float(model_thresholds.get(lab, thresholds[lab]))
        rows.append({"finding": lab, "probability": float(p), "threshold": t, "model_threshold": m,
                     "threshold_source": "reader" if abs(t - m) > 1e-9 else "model",
                     "positive": bool(p >= t), "confidence": confidence_band(p, t)})
    return sorted(rows, key=lambda r: (not r["positive"], -r["probability"]))


@dataclass
class Prediction:
    labels: list[str]
    probabilities: list[float]
    thresholds: dict[str, float]  # the findings' operating points (a negative class has none)
    meta: dict[str, Any]

    @property
    def findings(self) -> list[str]:
        """Labels at or above their operating threshold, most probable first."""
        return [r["finding"] for r in decide(self.labels, self.probabilities, self.thresholds) if r["positive"]]

    def to_dict(self) -> dict[str, Any]:
        return {"probabilities": dict(zip(self.labels, self.probabilities)),
                "thresholds": dict(self.thresholds), "findings": self.findings, "image": self.meta}


class Predictor:
    def __init__(self, checkpoint: str | os.PathLike | LoadedCheckpoint, device: str = "cpu",
                 limits: DecodeLimits = DEFAULT_LIMITS):
        self.ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, device)
        card = self.ckpt.card
        # channels-last: oneDNN's convolutions run about twice as fast on it for DenseNet121 on CPU
        # (benchmarks/inference_throughput.py); harmless for the ViT, whose only convolution is the patch embedding
        self.model = self.ckpt.model.to(memory_format=torch.channels_last)
        self.device = next(self.model.parameters()).device
        self.labels: list[str] = list(card["labels"])
        self.kind: str = card["task"]["kind"]
        self.spec = PreprocessSpec.from_dict(card["preprocessing"])
        self.temperature = float(card.get("temperature", 1.0))
        self.negative = negative_label(card)
        self.thresholds = {lab: float(card.get("thresholds", {}).get(lab, 0.5)) for lab in self.labels
                           if lab != self.negative}
        self.body_part: str | None = card.get("task", {}).get("body_part")
        self.limits = limits

    def decode(self, source: str | os.PathLike | bytes, name: str | None = None) -> DecodedImage:
        return decode_image(source, self.limits, name=name)

    def batch(self, images: list[DecodedImage]) -> torch.Tensor:
        """Preprocessed (as the card says), on the model's device, channels-last."""
        stacked = torch.stack([preprocess(im.pixels, self.spec) for im in images])
        return stacked.to(self.device, memory_format=torch.channels_last)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (the card's temperature) of a batch of logits."""
        return probs_from_logits(logits, self.kind, self.temperature)

    def prediction(self, probabilities: Any, image: DecodedImage) -> Prediction:
        return Prediction(self.labels, [float(p) for p in probabilities], self.thresholds, image.meta.to_dict())

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> np.ndarray:
        return self.model(batch.to(self.device, memory_format=torch.channels_last)).float().cpu().numpy()

    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities of a preprocessed batch."""
        return self.probabilities(self.logits(batch))

    def predict_images(self, images: list[DecodedImage]) -> list[Prediction]:
        probs = self.predict_tensor(self.batch(images))
        return [self.prediction(p, im) for p, im in zip(probs, images)]

    def predict(self, source: str | os.PathLike | bytes | DecodedImage, name: str | None = None) -> Prediction:
        image = source if isinstance(source, DecodedImage) else self.decode(source, name)
        return self.predict_images([image])[0]

    def predict_many(self, paths: list[str | Path], batch_size: int = 16) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            out += self.predict_images([self.decode(p) for p in paths[start:start + batch_size]])
        return out
