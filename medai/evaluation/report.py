"""From logits to the full evaluation: calibration, thresholds, metrics; eval.json + predictions.csv."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medai.atomic import atomic_open
from medai.errors import MedaiError
from medai.evaluation.calibration import expected_calibration_error, fit_temperature, probs_from_logits
from medai.evaluation.metrics import choose_thresholds, compute_metrics


def evaluate_logits(logits: np.ndarray, targets: np.ndarray, labels: list[str], kind: str, *,
                    temperature: float | None = None, thresholds: list[float] | None = None,
                    threshold_method: str = "youden", target_sensitivity: float = 0.95,
                    n_boot: int = 0, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """Fit temperature and thresholds when not given (validation), else apply the given ones (test).

    Returns the metrics (with a ``calibration`` block) and the calibrated probabilities."""
    fitted = temperature is None
    if fitted:
        temperature = fit_temperature(logits, targets, kind)
    raw = probs_from_logits(logits, kind)
    probs = probs_from_logits(logits, kind, temperature)
    if thresholds is None:
        thresholds = choose_thresholds(targets, probs, threshold_method, target_sensitivity)
    metrics = compute_metrics(targets, probs, labels, kind, thresholds, n_boot=n_boot, seed=seed)
    metrics["calibration"] = {
        "temperature": float(temperature), "fitted_here": fitted,
        "ece_before": expected_calibration_error(targets, raw, kind),
        "ece_after": expected_calibration_error(targets, probs, kind),
    }
    metrics["threshold_method"] = threshold_method if fitted else "from checkpoint"
    return metrics, probs


def write_predictions_csv(path: str | Path, ids: list[str], patients: list[str], targets: np.ndarray,
                          probs: np.ndarray, labels: list[str]) -> None:
    """Every probability exactly as it was scored (the shortest text that reads back to the same float): a
    table rounded to 6 decimals tied saturated scores, so metrics recomputed from it (the Metrics page's
    paired differences) drifted from those the evaluation stored beside it."""
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "patient_id", *[f"true_{lab}" for lab in labels],
                         *[f"prob_{lab}" for lab in labels]])
        for i, row_id in enumerate(ids):
            writer.writerow([row_id, patients[i], *targets[i].astype(int).tolist(),
                             *[repr(float(p)) for p in probs[i]]])


@dataclass
class PredictionTable:
    ids: list[str]
    labels: list[str]
    targets: np.ndarray | None  # N x C 0/1, None for a table of scores only
    probs: np.ndarray  # N x C


def read_predictions_csv(path: str | Path) -> PredictionTable:
    """Per-image probabilities: a ``predictions.csv`` as evaluation writes it (``id``, ``true_<label>``,
    ``prob_<label>``), or a reference's scores alone keyed by NIH's ``Image Index`` (CheXNet's on
    nih-cxr14-sample)."""
    import pandas as pd

    name = Path(path).name
    try:
        table = pd.read_csv(path, dtype={"id": str, "Image Index": str})
    except (OSError, ValueError) as exc:
        raise MedaiError(f"{name}: not a readable CSV ({exc})") from None
    key = next((k for k in ("id", "Image Index") if k in table.columns), None)
    labels = [c[len("prob_"):] for c in table.columns if c.startswith("prob_")]
    if key is None or not labels:
        raise MedaiError(f"{name}: needs an 'id' (or 'Image Index') column and 'prob_<label>' columns")
    has_truth = all(f"true_{lab}" in table.columns for lab in labels)
    try:
        probs = table[[f"prob_{lab}" for lab in labels]].to_numpy(dtype=float)
        targets = table[[f"true_{lab}" for lab in labels]].to_numpy(dtype=int) if has_truth else None
    except (ValueError, TypeError) as exc:
        raise MedaiError(f"{name}: a probability or label is not a number ({exc})") from None
    if not np.isfinite(probs).all() or (targets is not None and not np.isin(targets, (0, 1)).all()):
        raise MedaiError(f"{name}: probabilities must be finite numbers and labels 0 or 1")
    return PredictionTable(table[key].astype(str).tolist(), labels, targets, probs)
