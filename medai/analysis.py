"""The one door to the models for the Analyze page, the HTTP API, the CLI's predict and explain (and the
PACS node): decode and check an upload, predict, explain a finding with a method (lazily, one at a time),
decide findings at the reader's thresholds, render for display, record to History, and build the result
JSON and the PDF.

Below it: ``medai.inference`` (preprocessing, logits, the one ``decide``), ``medai.explain`` (heatmaps,
anatomy), ``medai.gate`` (what a model can read). The page (``medai/ui/analyze.py``) only renders what
these functions return.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


import numpy as np

from medai.audit import AuditAction
from medai import gate
from medai.data.io import DecodedImage, read_regular_file
from medai.explain.cam import CAM_METHODS, ExplainError
from medai.explain.explainer import Explanation, explain
from medai.explain.overlay import render_overlay, to_png
from medai.gate import Verdict, refusal_message
from medai.imaging import display_size, resize_float
from medai.inference import Prediction, Predictor, decide
from medai.report import report_pdf

__all__ = ["DISCLAIMER", "HEATMAP_METHODS", "REPORT_HEATMAPS", "Analysis", "Explanation", "Findings",
           "analyze_and_explain", "analyze_bytes", "analyze_path", "decide", "default_method", "display_film",
           "explain_image", "flat_result", "overlay", "record", "refusal_message", "report_pdf", "result_dict",
           "to_png", "update_record"]

DISCLAIMER = ("Decision support for trained readers, not a diagnosis. The model was trained on public research "
              "data and can be wrong; confirm every finding on the original image.")
HEATMAP_METHODS = list(CAM_METHODS)
REPORT_HEATMAPS = 3  # a report (the PDF, the PACS node's overlays) shows the heatmaps of this many positive findings
# What to explain: "all", "positive" (at the model's thresholds; the top one if none), "report" (the
# REPORT_HEATMAPS most probable of those), label names, or a function of the probabilities that returns
# names (a caller's own thresholds).
Findings = str | list[str] | Callable[[list[float]], list[str]]


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
    exp = explain_image(predictor, image, findings, method)
    prediction = predictor.prediction(exp.probabilities, image)
    return _analysis(predictor, model_name, data, file_name, image, prediction, verdict), exp


def default_method(predictor: Predictor) -> str:
    """The heatmap method the model explains with unless the reader picks another: the card's
    ``model.cam_method`` (its training config's, or set later with ``set-cam-method``); for a model trained
    with ``train.attention_loss``, the map its training moved onto the chest; else the architecture's
    measured best."""
    from medai.training.attention import method_for

    cfg = predictor.ckpt.card.get("training_config", {})
    chosen = cfg.get("model", {}).get("cam_method")
    if (cfg.get("train", {}).get("attention_loss") or 0) > 0:
        return method_for(chosen)
    return chosen or predictor.model.cam_method


def select_findings(predictor: Predictor, probabilities: list[float], findings: Findings) -> list[int]:
    """The label indices ``findings`` names (see :data:`Findings`)."""
    labels = predictor.labels
    if callable(findings):
        findings = findings(probabilities)
    if findings == "all":
        return list(range(len(labels)))
    if findings in ("positive", "report"):
        rows = decide(labels, probabilities, predictor.thresholds)
        chosen = [r["finding"] for r in rows if r["positive"]] or [r["finding"] for r in rows[:1]]
        chosen = chosen[:REPORT_HEATMAPS] if findings == "report" else chosen
        return [labels.index(lab) for lab in chosen] or [int(np.argmax(probabilities))]
    unknown = [f for f in findings if f not in labels]
    if unknown:
        raise ExplainError(f"unknown findings {unknown}; this model knows {labels}")
    return [labels.index(f) for f in findings]


def explain_image(predictor: Predictor, image: DecodedImage, findings: Findings = "positive",
                  method: str | None = None, probabilities: list[float] | None = None) -> Explanation:
    """Heatmaps of ``findings`` with ``method`` (the model's default if None), the anatomy and the
    attention shares. ``probabilities``: the prediction when the caller has it; without them the heatmaps'
    own forward pass gives it (``Explanation.probabilities``): one forward pass in all."""
    probs = list(probabilities) if probabilities is not None else []

    def pick(logits: np.ndarray) -> list[int]:
        if not probs:  # the prediction, from the same logits the heatmaps come from
            probs.extend(float(p) for p in predictor.probabilities(logits[None])[0])
        return select_findings(predictor, probs, findings)

    exp = explain(predictor.model, predictor.batch([image]), image, pick, method or default_method(predictor),
                  labels=predictor.labels, softmax=predictor.kind == "multiclass", model_body_part=predictor.body_part)
    exp.probabilities, exp.thresholds = probs, dict(predictor.thresholds)
    return exp


def display_film(full_u8: np.ndarray) -> np.ndarray:
    """The windowed film (uint8, original resolution) at display size, in [0, 1]: what on-screen
    heatmaps are drawn on."""
    return resize_float(full_u8.astype(np.float32) / 255, display_size(full_u8.shape))


def overlay(film: np.ndarray, exp: Explanation, finding: str, opacity: float = 0.45, contours: bool = True
            ) -> np.ndarray:
    """RGB overlay of ``finding``'s heatmap on ``film`` ([0, 1] or uint8, any size), with the lung and
    heart outlines when ``contours``."""
    pixels = film.astype(np.float32) / 255 if film.dtype == np.uint8 else film
    heat = exp.heatmaps[finding] if pixels.shape == exp.heatmaps.size else exp.heatmaps.at(finding, pixels.shape)
    return render_overlay(pixels, heat, opacity, exp.anatomy if contours else None)


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


def _png_of(pixels: np.ndarray) -> bytes:
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray((pixels * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def record(username: str, analysis: Analysis, card: dict[str, Any], thresholds: dict[str, float],
           store: Any = None, dicom_uids: dict[str, str] | None = None,
           replace: int | None = None) -> tuple[int, dict[str, Any]]:
    """History row and audit entry at the thresholds the reader sees: hashes, model and findings (or the
    refusal); pixels only if the admin allows it. ``dicom_uids`` (Study / SOP Instance UID) link a row to
    its study in the PACS. ``replace``: the id of a row this same analysis wrote before (the PACS node
    killed before it marked the item done), overwritten instead of a second row. Returns the row's id and
    the stored result."""
    from medai.store import Store

    db = store or Store()
    result = result_dict(analysis, thresholds, card)
    if dicom_uids:
        result["dicom"] = dict(dicom_uids)
    if replace is not None:
        db.update_history_result(replace, result["findings"], result)
        entry_id = replace
    else:
        pixels = _png_of(analysis.image.pixels) if db.get_setting("store_pixels") else None
        entry_id = db.add_history(username, analysis.model_name, analysis.model_sha256, analysis.file_name,
                                  analysis.image_sha256, result["findings"], result, pixels)
    db.audit(username, AuditAction.ANALYSIS, model=analysis.model_name, image_sha256=analysis.image_sha256,
             findings=result["findings"], status=result["status"])
    return entry_id, result


def update_record(username: str, entry_id: int, analysis: Analysis, result: dict[str, Any], store: Any = None) -> None:
    """Re-decide a History row (a changed threshold, or the explanation summary added); a threshold the
    reader changed is audited with the findings it gives."""
    from medai.store import Store

    db = store or Store()
    db.update_history_result(entry_id, result["findings"], result)
    changed = {k: v for k, v in result["thresholds"].items() if v["source"] == "reader"}
    if changed:
        db.audit(username, AuditAction.THRESHOLDS_CHANGED, history_id=entry_id, image_sha256=analysis.image_sha256,
                 thresholds={k: v["value"] for k, v in changed.items()}, findings=result["findings"])
