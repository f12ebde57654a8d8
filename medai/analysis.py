"""What the Analyze page does, without Streamlit: decode an upload, predict, decide findings at chosen
thresholds, describe confidence in words, and build the downloadable JSON and PDF report.

The page (``medai/ui/analyze.py``) only renders what these functions return.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from medai.data.io import DecodedImage
from medai.explain.explainer import Explanation, Findings, explain
from medai.inference import Prediction, Predictor

DISCLAIMER = ("Decision support for trained readers, not a diagnosis. The model was trained on public research "
              "data and can be wrong; confirm every finding on the original image.")
BORDERLINE_MARGIN = 0.10


@dataclass
class Analysis:
    file_name: str
    image_sha256: str
    image: DecodedImage
    prediction: Prediction
    model_name: str
    model_sha256: str

    @property
    def labels(self) -> list[str]:
        return self.prediction.labels


def _analysis(predictor: Predictor, model_name: str, data: bytes, file_name: str, image: DecodedImage,
              prediction: Prediction) -> Analysis:
    return Analysis(file_name=file_name, image_sha256=hashlib.sha256(data).hexdigest(), image=image,
                    prediction=prediction, model_name=model_name, model_sha256=predictor.ckpt.sha256)


def analyze_bytes(predictor: Predictor, model_name: str, data: bytes, file_name: str) -> Analysis:
    """Decode and predict one upload; decoding errors (``ImageDecodeError``) propagate with their message."""
    image = predictor.decode(data, name=file_name)
    return _analysis(predictor, model_name, data, file_name, image, predictor.predict(image))


def analyze_and_explain(predictor: Predictor, model_name: str, data: bytes, file_name: str,
                        findings: Findings = "positive", method: str | None = None
                        ) -> tuple[Analysis, Explanation]:
    """Decode, predict and explain in one forward pass: the heatmaps' forward pass gives the prediction
    (``analyze_bytes`` + ``explain`` would run the model twice)."""
    image = predictor.decode(data, name=file_name)
    exp = explain(predictor, image, findings, method)
    prediction = Prediction(predictor.labels, list(exp.probabilities), predictor.thresholds, image.meta.to_dict())
    return _analysis(predictor, model_name, data, file_name, image, prediction), exp


def confidence_band(probability: float, threshold: float) -> str:
    """The model's output relative to the operating threshold, in words."""
    margin = probability - threshold
    if abs(margin) < BORDERLINE_MARGIN:
        return "borderline"
    if margin > 0:
        return "likely" if margin < 0.3 else "very likely"
    return "unlikely" if -margin < 0.3 else "very unlikely"


def decide(labels: list[str], probabilities: list[float], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """One row per label: positives first (most probable first), then the rest by probability."""
    rows = [{"finding": lab, "probability": float(p), "threshold": float(thresholds[lab]),
             "positive": bool(p >= thresholds[lab]), "confidence": confidence_band(p, thresholds[lab])}
            for lab, p in zip(labels, probabilities)]
    return sorted(rows, key=lambda r: (not r["positive"], -r["probability"]))


def chest_check(predictor: Predictor, anatomy_applicable: bool, anatomy_reason: str) -> str | None:
    """A warning when a chest model is given an image that does not look like a frontal chest X-ray."""
    body_part = (predictor.ckpt.card.get("task", {}).get("body_part") or "").lower()
    if body_part == "chest" and not anatomy_applicable:
        return (f"{anatomy_reason or 'this does not look like a frontal chest X-ray'}. This model was trained "
                "on chest X-rays only; its output for this image is not meaningful.")
    return None


def window(pixels: np.ndarray, level: float, width: float) -> np.ndarray:
    """Display window on the decoded [0, 1] image: uint8 grey levels for ``level +/- width/2``."""
    lo, hi = level - width / 2, level + width / 2
    return (np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)


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
    rows = decide(analysis.labels, analysis.prediction.probabilities, thresholds)
    return {
        "file": analysis.file_name, "image_sha256": analysis.image_sha256, "image": meta,
        "model": {"name": analysis.model_name, "sha256": analysis.model_sha256, **card_summary(card)},
        "findings": [r["finding"] for r in rows if r["positive"]],
        "results": rows,
        "explanation": explanation, "disclaimer": DISCLAIMER,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def report_pdf(result: dict[str, Any], image_u8: np.ndarray, overlay_rgb: np.ndarray | None,
               overlay_title: str = "") -> bytes:
    """A one-page A4 PDF: image, overlay, findings table, model summary and the disclaimer."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.27, 11.69))
    fig.text(0.06, 0.965, "MedAI CXR - analysis report", fontsize=16, weight="bold")
    fig.text(0.06, 0.945, f"{result['file']}   |   {result['created_at']}   |   image sha256 "
             f"{result['image_sha256'][:16]}...", fontsize=7.5, color="#444")
    for i, (img, title) in enumerate(((image_u8, "Image"), (overlay_rgb, overlay_title or "Heatmap"))):
        if img is None:
            continue
        ax = fig.add_axes((0.06 + i * 0.46, 0.56, 0.42, 0.37))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    rows = result["results"][:15]
    table_ax = fig.add_axes((0.06, 0.22, 0.88, 0.31))
    table_ax.axis("off")
    cells = [[r["finding"], f"{r['probability']:.3f}", f"{r['threshold']:.3f}",
              "POSITIVE" if r["positive"] else "-", r["confidence"]] for r in rows]
    table = table_ax.table(cellText=cells, colLabels=["Finding", "Probability", "Threshold", "Call", "Confidence"],
                           loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (row, _), cell in table.get_celld().items():
        if row > 0 and rows[row - 1]["positive"]:
            cell.set_facecolor("#fde8e4")
    model = result["model"]
    auroc = f"{model['val_auroc']:.3f}" if isinstance(model.get("val_auroc"), (int, float)) else "n/a"
    lines = [f"Model: {model['name']} ({model['architecture']}, task {model['task']}, validation AUROC {auroc}, "
             f"sha256 {model['sha256'][:12]}...)"]
    ctr = ((result.get("explanation") or {}).get("cardiothoracic_ratio") or {}).get("ctr")
    if ctr is not None:
        lines.append(f"Cardiothoracic ratio (automatic estimate): {ctr:.2f}")
    if model.get("limitations"):
        lines.append(f"Limitations: {model['limitations']}")
    fig.text(0.06, 0.19, "\n".join(lines), fontsize=8, va="top", wrap=True)
    fig.text(0.06, 0.06, DISCLAIMER, fontsize=9, weight="bold", color="#8a1c1c", wrap=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf", metadata={"Title": "MedAI CXR analysis report", "Creator": "MedAI CXR"})
    return buf.getvalue()
