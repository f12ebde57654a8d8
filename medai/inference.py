"""Predictor: checkpoint -> preprocess (from the card) -> calibrated probabilities and findings."""

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


def findings_at(labels: list[str], probabilities: list[float], thresholds: dict[str, float]) -> list[str]:
    """Labels with a threshold whose probability reaches it, most probable first."""
    hits = [(p, lab) for lab, p in zip(labels, probabilities) if lab in thresholds and p >= thresholds[lab]]
    return [lab for _, lab in sorted(hits, reverse=True)]


@dataclass
class Prediction:
    labels: list[str]
    probabilities: list[float]
    thresholds: dict[str, float]  # the findings' operating points (a negative class has none)
    meta: dict[str, Any]

    @property
    def findings(self) -> list[str]:
        """Labels at or above their operating threshold, most probable first."""
        return findings_at(self.labels, self.probabilities, self.thresholds)

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
        self.limits = limits

    def decode(self, source: str | os.PathLike | bytes, name: str | None = None) -> DecodedImage:
        return decode_image(source, self.limits, name=name)

    @torch.inference_mode()
    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        logits = self.model(batch.to(self.device, memory_format=torch.channels_last)).float().cpu().numpy()
        return probs_from_logits(logits, self.kind, self.temperature)

    def predict(self, source: str | os.PathLike | bytes | DecodedImage, name: str | None = None) -> Prediction:
        image = source if isinstance(source, DecodedImage) else self.decode(source, name)
        probs = self.predict_tensor(preprocess(image.pixels, self.spec).unsqueeze(0))[0]
        return Prediction(self.labels, [float(p) for p in probs], self.thresholds, image.meta.to_dict())

    def predict_many(self, paths: list[str | Path], batch_size: int = 16) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            images = [self.decode(p) for p in paths[start:start + batch_size]]
            batch = torch.stack([preprocess(im.pixels, self.spec) for im in images])
            for im, probs in zip(images, self.predict_tensor(batch)):
                out.append(Prediction(self.labels, [float(p) for p in probs], self.thresholds, im.meta.to_dict()))
        return out
