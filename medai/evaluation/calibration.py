"""Temperature scaling (Guo et al. 2017) fitted on validation logits, and expected calibration error."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def probs_from_logits(logits: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    z = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return (torch.sigmoid(z) if kind == "multilabel" else torch.softmax(z, dim=-1)).numpy()


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, kind: str, bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins: mean confidence, observed accuracy and count of each non-empty bin
    (top-label confidence for multi-class, every (image, class) probability for multi-label)."""
    if kind == "multiclass":
        conf = probs.max(1)
        correct = (probs.argmax(1) == y_true.argmax(1)).astype(float)
    else:
        conf, correct = probs.ravel(), y_true.ravel().astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return [{"confidence": float(conf[which == b].mean()), "accuracy": float(correct[which == b].mean()),
             "count": int((which == b).sum())} for b in range(bins) if (which == b).any()]


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, kind: str, bins: int = 15) -> float:
    """ECE: the count-weighted gap between confidence and accuracy over :func:`reliability_bins`."""
    rows = reliability_bins(y_true, probs, kind, bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, kind: str) -> float:
    """One temperature minimising validation NLL (LBFGS on log T, so T stays positive)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(y_true, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        scaled = z / log_t.exp()
        loss = (F.binary_cross_entropy_with_logits(scaled, y) if kind == "multilabel"
                else F.cross_entropy(scaled, y.argmax(1)))
        loss.backward()
        return loss

    opt.step(nll)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) and 0.05 <= t <= 20 else 1.0
