"""The input gate: refuse an image a model cannot read before any finding is shown or stored.

Each model reads one kind of image, from its card's task (``body_part``): ``chest`` models read frontal
chest radiographs, ``brain`` models axial brain MRI slices. A model of another body part has no gate
kind and is not checked (its card says so). The verdict comes from two sources:

1. **DICOM tags**, where present: a chest model refuses MR/CT/US/NM/PT, a body part other than the chest
   and lateral views; a brain model refuses anything that is not MR.
2. **The pixels, always**: ImageNet EfficientNet-Lite0 features (the pretrained backbone's pooled 1280
   features of the grey image at 224 px), reduced by PCA, then (a) a logistic regression over the kinds
   ``chest_xray``, ``brain_mri`` and ``other`` and (b) the Mahalanobis distance to the expected kind's
   fitting images, so that kinds of image never seen in fitting, far from every chest film, are refused
   too. Both must agree for an image to pass.

The fitted gate is ``models/gate/input-gate.safetensors`` (arrays plus a JSON card with what it was fitted
on); ``medai gate fit`` refits it from ``../shared/data`` and ``benchmarks/input_gate.py`` reports its
confusion table on held-out images and kinds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from medai.data.io import DecodedImage
from medai.imaging import resize_float
from medai.errors import CheckpointError

KINDS = ("chest_xray", "brain_mri", "other")
KIND_NAMES = {"chest_xray": "a frontal chest X-ray", "brain_mri": "an axial brain MRI slice", "other": "another kind of image"}
BODY_PART_KIND = {"chest": "chest_xray", "brain": "brain_mri"}
GATE_FILE = "input-gate.safetensors"
FEATURE_SIZE = 224
NON_RADIOGRAPH = {"MR", "CT", "US", "NM", "PT"}  # not SC/OT: digitised films use them
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS", "HEART"}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}


@dataclass
class Verdict:
    accepted: bool
    expected: str | None  # the kind the model reads (None: not checked)
    reason: str = ""
    source: str = "pixels"  # tags | pixels | none
    kind: str | None = None  # what the pixels look like
    probability: float | None = None  # P(expected kind) from the classifier
    distance: float | None = None  # Mahalanobis distance to the expected kind / its limit (<= 1 passes)

    def to_dict(self) -> dict:
        return asdict(self)


def expected_kind(card: dict) -> str | None:
    return BODY_PART_KIND.get(str(card.get("task", {}).get("body_part") or "").lower())


def tag_reason(kind: str, modality: str | None, body_part: str | None, view: str | None) -> str | None:
    """Why the DICOM tags rule the image out for a model reading ``kind``, or None."""
    modality, body_part, view = ((v or "").upper() for v in (modality, body_part, view))
    if kind == "chest_xray":
        if modality in NON_RADIOGRAPH:
            return f"the DICOM modality is {modality}, not a radiograph"
        if body_part and body_part not in CHEST_BODY_PARTS:
            return f"the DICOM body part is {body_part}, not the chest"
        if view in LATERAL_VIEWS:
            return f"the DICOM view is {view}; this model reads frontal (PA/AP) films"
    if kind == "brain_mri" and modality and modality != "MR":
        return f"the DICOM modality is {modality}, not MR"
    return None


class FeatureExtractor:
    """Pooled ImageNet EfficientNet-Lite0 features of a grey image (1280 values)."""

    def __init__(self):
        from medai.models.efficientnet import build_lite, fuse_lite, run_blocks
        from medai.models.pretrained import load_pretrained

        self.net = build_lite("efficientnet-lite0")
        load_pretrained(self.net, "imagenet-efficientnet-lite0")
        fuse_lite(self.net.eval())  # BatchNorm folded into the convolutions: inference only
        self.net.to(memory_format=torch.channels_last)  # oneDNN's faster layout on CPU
        self._run = run_blocks

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack([resize_float(im, (FEATURE_SIZE, FEATURE_SIZE)) for im in images]))[:, None]
        x = ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
        net = self.net
        h = net._swish(net._bn1(net._conv_head(self._run(net, x))))
        return h.mean(dim=(2, 3)).numpy().astype(np.float64)


@lru_cache(maxsize=1)
def feature_extractor() -> FeatureExtractor:
    return FeatureExtractor()


class InputGate:
    def __init__(self, arrays: dict[str, np.ndarray], card: dict):
        self.a = arrays
        self.card = card

    @classmethod
    def load(cls, path: Path) -> InputGate:
        from medai.models.checkpoint import read_tensors

        arrays, card = read_tensors(path, "np", "input-gate file")
        return cls({k: v.astype(np.float64) for k, v in arrays.items()}, card)

    def project(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.a["feature_mean"]) / self.a["feature_scale"]
        return (z - self.a["pca_mean"]) @ self.a["pca_components"].T

    def scores(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (n, kinds) and Mahalanobis distance over its limit (n, kinds)."""
        p = self.project(features)
        logits = p @ self.a["lr_coef"].T + self.a["lr_intercept"]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        dist = np.stack([np.sqrt(np.einsum("ni,ij,nj->n", p - self.a[f"mean_{k}"], self.a[f"precision_{k}"],
                                           p - self.a[f"mean_{k}"])) / self.a[f"limit_{k}"][0]
                         for k in KINDS[:2]], axis=1)
        return probs, dist

    def judge_pixels(self, features: np.ndarray, expected: str) -> list[Verdict]:
        probs, dist = self.scores(features)
        col = KINDS.index(expected)
        min_p = float(self.a["min_probability"][0])
        out = []
        for pr, di in zip(probs, dist):
            kind = KINDS[int(np.argmax(pr))]
            p, d = float(pr[col]), float(di[col])
            if p < min_p:
                reason = (f"it looks like {KIND_NAMES[kind]} (classifier: {p:.0%} {KIND_NAMES[expected]}), "
                          f"not {KIND_NAMES[expected]}")
            elif d > 1.0:
                reason = (f"it is unlike the {KIND_NAMES[expected].split(' ', 1)[1]}s the gate was fitted on "
                          f"(distance {d:.2f} x the limit)")
            else:
                reason = ""
            out.append(Verdict(not reason, expected, reason, "pixels", kind, round(p, 4), round(d, 3)))
        return out

    def check(self, images: list[DecodedImage], expected: str | None) -> list[Verdict]:
        """One verdict per image for a model reading ``expected`` (None: not checked, all accepted)."""
        if expected is None:
            return [Verdict(True, None, "this model's task has no input check", "none") for _ in images]
        verdicts: list[Verdict | None] = []
        todo = []
        for i, image in enumerate(images):
            why = tag_reason(expected, image.meta.modality, image.meta.body_part, image.meta.view)
            verdicts.append(Verdict(False, expected, why, "tags") if why else None)
            if not why:
                todo.append(i)
        if todo:
            feats = feature_extractor()([images[i].pixels for i in todo])
            for i, v in zip(todo, self.judge_pixels(feats, expected)):
                verdicts[i] = v
        return verdicts  # type: ignore[return-value]


def gate_path() -> Path:
    from medai.paths import SHIPPED_MODELS_DIR

    return SHIPPED_MODELS_DIR / "gate" / GATE_FILE


def input_gate(path: Path | None = None) -> InputGate:
    path = path or gate_path()
    if not path.is_file():
        raise CheckpointError(f"the input gate {path} is missing: reinstall, or refit it with `medai gate fit`")
    from medai.models.checkpoint import load_cached

    return load_cached(InputGate.load, path)


def check(images: list[DecodedImage], card: dict) -> list[Verdict]:
    return input_gate().check(images, expected_kind(card))


def refusal_message(verdict: Verdict) -> str:
    return (f"Not analysed: this model reads {KIND_NAMES.get(verdict.expected or '', 'other images')}, and "
            f"{verdict.reason}. No findings are given for this image.")
