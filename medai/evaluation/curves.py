"""Curves and operating-point tables for the Metrics page, from targets and calibrated probabilities."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from medai.evaluation.metrics import binary_stats


def roc_points(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per class: false/true positive rates (classes with one outcome only are left out)."""
    out = {}
    for c, lab in enumerate(labels):
        if 0 < y_true[:, c].sum() < len(y_true):
            fpr, tpr, _ = roc_curve(y_true[:, c], probs[:, c])
            out[lab] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def pr_points(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, dict[str, list[float]]]:
    out = {}
    for c, lab in enumerate(labels):
        if y_true[:, c].sum() > 0:
            precision, recall, _ = precision_recall_curve(y_true[:, c], probs[:, c])
            out[lab] = {"recall": recall.tolist(), "precision": precision.tolist(),
                        "prevalence": float(y_true[:, c].mean())}
    return out


def at_threshold(y_true: np.ndarray, probs: np.ndarray, label_index: int, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and the 2x2 table of one class at one threshold."""
    return binary_stats(y_true[:, label_index].astype(int), (probs[:, label_index] >= threshold).astype(int))


def multiclass_confusion(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Rows: true class, columns: predicted class (arg-max)."""
    k = y_true.shape[1]
    return confusion_matrix(y_true.argmax(1), probs.argmax(1), labels=list(range(k)))


def comparison_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
