"""Per-class and macro/micro metrics with scikit-learn, bootstrap CIs and operating thresholds.

``y_true`` is an N x C 0/1 matrix (one-hot for multi-class), ``probs`` N x C probabilities.
Classes with a single value in ``y_true`` get ``None`` for rank metrics instead of an exception.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score,
                             precision_recall_curve, roc_auc_score, roc_curve)


def _defined(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def auroc_per_class(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    return [float(roc_auc_score(y_true[:, c], probs[:, c])) if _defined(y_true[:, c]) else None
            for c in range(y_true.shape[1])]


def macro(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def quick_scores(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """Macro AUROC and mAP: the numbers tracked every epoch."""
    aurocs = auroc_per_class(y_true, probs)
    aps = [float(average_precision_score(y_true[:, c], probs[:, c])) if _defined(y_true[:, c]) else None
           for c in range(y_true.shape[1])]
    return {"auroc": macro(aurocs), "map": macro(aps)}


def choose_thresholds(y_true: np.ndarray, probs: np.ndarray, method: str = "youden",
                      target_sensitivity: float = 0.95) -> list[float]:
    """Per-class operating thresholds: Youden's J (sensitivity + specificity), the best F1 (precision and
    sensitivity: far fewer false positives on rare findings, where Youden's threshold flags a third of all
    negatives), or the highest threshold reaching a sensitivity."""
    out = []
    for c in range(y_true.shape[1]):
        if not _defined(y_true[:, c]):
            out.append(0.5)
            continue
        if method == "f1":
            out.append(_best_f1_threshold(y_true[:, c], probs[:, c]))
            continue
        fpr, tpr, thr = roc_curve(y_true[:, c], probs[:, c])
        thr = np.clip(thr, 0.0, 1.0)  # sklearn's first threshold is +inf
        if method == "youden":
            i = int(np.argmax(tpr - fpr))
        else:
            reach = np.flatnonzero(tpr >= target_sensitivity)
            i = int(reach[0]) if len(reach) else len(thr) - 1
        out.append(float(thr[i]))
    return out


def _best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    precision, recall, thr = precision_recall_curve(y, p)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def bootstrap_auroc_ci(y_true: np.ndarray, probs: np.ndarray, n_boot: int = 500, seed: int = 0,
                       alpha: float = 0.05) -> list[tuple[float, float] | None]:
    """Percentile bootstrap CI of each class's AUROC (resampling images)."""
    rng = np.random.default_rng(seed)
    n, n_cls = y_true.shape
    samples: list[list[float]] = [[] for _ in range(n_cls)]
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        yt, pp = y_true[idx], probs[idx]
        for c in range(n_cls):
            if _defined(yt[:, c]):
                samples[c].append(roc_auc_score(yt[:, c], pp[:, c]))
    return [(float(np.quantile(s, alpha / 2)), float(np.quantile(s, 1 - alpha / 2))) if len(s) > 10
            else None for s in samples]


def binary_stats(y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()

    def ratio(a: int, b: int) -> float | None:
        return float(a / (a + b)) if (a + b) else None

    return {"sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp),
            "npv": ratio(tn, fn), "f1": float(f1_score(y, pred, zero_division=0)),
            "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str], kind: str,
                    thresholds: list[float] | None = None, n_boot: int = 0,
                    seed: int = 0) -> dict[str, Any]:
    """Everything the Metrics page and the model card show."""
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = thresholds or [0.5] * len(labels)
    aurocs = auroc_per_class(y_true, probs)
    cis = bootstrap_auroc_ci(y_true, probs, n_boot, seed) if n_boot else [None] * len(labels)
    per_class = {}
    for c, lab in enumerate(labels):
        pred = (probs[:, c] >= thresholds[c]).astype(int)
        defined = _defined(y_true[:, c])
        per_class[lab] = {
            "auroc": aurocs[c], "auroc_ci95": list(cis[c]) if cis[c] else None,
            "ap": float(average_precision_score(y_true[:, c], probs[:, c])) if defined else None,
            "threshold": float(thresholds[c]), "support": int(y_true[:, c].sum()),
            **binary_stats(y_true[:, c], pred),
        }
    out: dict[str, Any] = {
        "n": int(len(y_true)), "kind": kind, "labels": list(labels), "per_class": per_class,
        "macro": {k: macro([per_class[lab][k] for lab in labels])
                  for k in ("auroc", "ap", "f1", "sensitivity", "specificity")},
    }
    flat_ok = 0 < y_true.sum() < y_true.size
    binarized = (probs >= np.asarray(thresholds)).astype(int)
    out["micro"] = {
        "auroc": float(roc_auc_score(y_true.ravel(), probs.ravel())) if flat_ok else None,
        "ap": float(average_precision_score(y_true.ravel(), probs.ravel())) if flat_ok else None,
        "f1": float(f1_score(y_true.ravel(), binarized.ravel(), zero_division=0)),
    }
    if kind == "multiclass":
        truth, pred = y_true.argmax(1), probs.argmax(1)
        out["accuracy"] = float(accuracy_score(truth, pred))
        out["confusion_matrix"] = confusion_matrix(truth, pred, labels=list(range(len(labels)))).tolist()
    return out
