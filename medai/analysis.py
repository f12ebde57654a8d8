"""What the Analyze page does, without Streamlit: decode an upload, predict, decide findings at chosen
thresholds, describe confidence in words, and build the result JSON (the PDF is `medai.report`).

The page (``medai/ui/analyze.py``) only renders what these functions return.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from medai import gate
from medai.data.io import DecodedImage, read_regular_file
from medai.gate import Verdict, refusal_message
from medai.explain.explainer import Explanation, Findings, explain
from medai.inference import Prediction, Predictor

DISCLAIMER = ("Decision support for trained readers, not a diagnosis. The model was trained on public research "
              "data and can be wrong; confirm every finding on the original image.")
BORDERLINE_MARGIN = 0.10


@dataclass
class Analysis:
    """One image through one model. A refused image (the input gate's verdict) has no prediction: no
    probability of it is ever shown or stored as a finding."""
    file_name: str
    image_sha256: str
    image: DecodedImage
    prediction: Prediction | None
    model_name: str
    model_sha256: str
    verdict: Verdict

    @property
    def refused(self) -> bool:
        return not self.verdict.accepted

    @property
    def labels(self) -> list[str]:
        return self.prediction.labels if self.prediction else []


def _analysis(predictor: Predictor, model_name: str, data: bytes, file_name: str, image: DecodedImage,
              prediction: Prediction | None, verdict: Verdict) -> Analysis:
    return Analysis(file_name=file_name, image_sha256=hashlib.sha256(data).hexdigest(), image=image,
                    prediction=prediction, model_name=model_name, model_sha256=predictor.ckpt.sha256,
                    verdict=verdict)


def gate_verdict(predictor: Predictor, image: DecodedImage) -> Verdict:
    """Whether ``predictor``'s model can read ``image`` (tags and pixels; ``medai/gate.py``)."""
    return gate.check([image], predictor.ckpt.card)[0]


def analyze_bytes(predictor: Predictor, model_name: str, data: bytes, file_name: str) -> Analysis:
    """Decode, check and predict one upload; decoding errors (``ImageDecodeError``) propagate with their
    message; a refused image is returned without a prediction."""
    image = predictor.decode(data, name=file_name)
    verdict = gate_verdict(predictor, image)
    prediction = predictor.predict(image) if verdict.accepted else None
    return _analysis(predictor, model_name, data, file_name, image, prediction, verdict)


def analyze_and_explain(predictor: Predictor, model_name: str, data: bytes, file_name: str,
                        findings: Findings = "positive", method: str | None = None
                        ) -> tuple[Analysis, Explanation | None]:
    """Decode, check, predict and explain in one forward pass: the heatmaps' forward pass gives the
    prediction (``analyze_bytes`` + ``explain`` would run the model twice). Refused: no explanation."""
    image = predictor.decode(data, name=file_name)
    verdict = gate_verdict(predictor, image)
    if not verdict.accepted:
        return _analysis(predictor, model_name, data, file_name, image, None, verdict), None
    exp = explain(predictor, image, findings, method)
    prediction = Prediction(predictor.labels, list(exp.probabilities), dict(predictor.thresholds),
                            image.meta.to_dict())
    return _analysis(predictor, model_name, data, file_name, image, prediction, verdict), exp


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
    """One row per finding (a label with a threshold: a negative class such as NORMAL is none), positives
    first (most probable first), then the rest by probability. Each row says whether its threshold is the
    model's operating point or the reader's own, with the model's value beside it."""
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


def chest_check(predictor: Predictor, anatomy_applicable: bool, anatomy_reason: str) -> str | None:
    """A warning when a chest model is given an image that does not look like a frontal chest X-ray."""
    body_part = (predictor.ckpt.card.get("task", {}).get("body_part") or "").lower()
    if body_part == "chest" and not anatomy_applicable:
        return (f"{anatomy_reason or 'this does not look like a frontal chest X-ray'}. This model was trained "
                "on chest X-rays only; its output for this image is not meaningful.")
    return None


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The few facts of a model card a reader needs beside a result."""
    val = card.get("metrics", {}).get("val", {})
    macro = val.get("macro", {}) if isinstance(val, dict) else {}
    return {"task": card.get("task", {}).get("name") or card.get("task", {}).get("kind"),
            "architecture": card.get("architecture"), "labels": card.get("labels"),
            "image_size": card.get("preprocessing", {}).get("image_size"),
            "val_auroc": macro.get("auroc"), "created_at": card.get("created_at"),
            "intended_use": card.get("intended_use"), "limitations": card.get("limitations")}


def result_dict(analysis: Analysis, thresholds: dict[str, float], card: dict[str, Any],
                explanation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full, JSON-serialisable result of one analysis (no pixels, no patient tags)."""
    meta = {k: v for k, v in analysis.image.meta.to_dict().items() if k != "extra"}
    meta["decoder_warnings"] = list(analysis.image.meta.extra.get("warnings", []))
    common = {"file": analysis.file_name, "image_sha256": analysis.image_sha256, "image": meta,
              "model": {"name": analysis.model_name, "sha256": analysis.model_sha256, **card_summary(card)},
              "input_gate": analysis.verdict.to_dict(), "disclaimer": DISCLAIMER,
              "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if analysis.refused:
        return {**common, "status": "refused", "refusal": refusal_message(analysis.verdict), "findings": [],
                "results": [], "thresholds": {}, "explanation": None}
    rows = decide(analysis.labels, analysis.prediction.probabilities, thresholds, analysis.prediction.thresholds)
    return {**common, "status": "analysed", "findings": [r["finding"] for r in rows if r["positive"]],
            "results": rows, "thresholds": {r["finding"]: {"value": r["threshold"], "model": r["model_threshold"],
                                                           "source": r["threshold_source"]} for r in rows},
            "explanation": explanation}


def flat_result(analysis: Analysis, card: dict[str, Any], explanation: dict[str, Any] | None = None,
                warnings: list[str] | None = None) -> dict[str, Any]:
    """The API's and the CLI's result: ``result_dict`` at the model's operating points, plus flat
    ``probabilities`` and ``operating_points``; a refused image carries its refusal as the one warning and
    no probabilities."""
    result = result_dict(analysis, dict(analysis.prediction.thresholds) if analysis.prediction else {}, card,
                         explanation)
    if analysis.refused:
        return {**result, "warnings": [result["refusal"]]}
    return {**result, "probabilities": dict(zip(analysis.labels, analysis.prediction.probabilities)),
            "operating_points": dict(analysis.prediction.thresholds), "warnings": list(warnings or [])}


def analyze_path(predictor: Predictor, path: str, findings: Findings | None = None, method: str | None = None
                 ) -> tuple[Analysis, Explanation | None]:
    """``analyze_bytes`` / ``analyze_and_explain`` (when ``findings`` is given) of a file on disk, read only
    if it is a regular file within the decoder's size limit."""
    data = read_regular_file(Path(path), path, predictor.limits.max_file_bytes)
    name = Path(predictor.ckpt.path).stem
    if findings is None:
        return analyze_bytes(predictor, name, data, path), None
    return analyze_and_explain(predictor, name, data, path, findings, method)
