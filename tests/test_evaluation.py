"""Metrics agree with scikit-learn and hand counts; thresholds and temperature scaling behave."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from medai.evaluation.calibration import expected_calibration_error, fit_temperature, probs_from_logits
from medai.evaluation.metrics import choose_thresholds, compute_metrics
from medai.evaluation.report import evaluate_logits


def noisy_scores(n=400, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    logits = (y * 2 - 1) * rng.gamma(2.0, 1.0, (n, c)) + rng.normal(0, 1.5, (n, c))
    return y, logits


def test_metrics_match_sklearn_and_hand_counts():
    y, logits = noisy_scores()
    probs = probs_from_logits(logits, "multilabel")
    m = compute_metrics(y, probs, ["a", "b", "c"], "multilabel", thresholds=[0.5, 0.4, 0.6], n_boot=200)
    for c, lab in enumerate("abc"):
        r = m["per_class"][lab]
        assert np.isclose(r["auroc"], roc_auc_score(y[:, c], probs[:, c]))
        assert np.isclose(r["ap"], average_precision_score(y[:, c], probs[:, c]))
        pred = probs[:, c] >= [0.5, 0.4, 0.6][c]
        tp = int((pred & (y[:, c] == 1)).sum())
        assert r["tp"] == tp and np.isclose(r["sensitivity"], tp / y[:, c].sum())
        lo, hi = r["auroc_ci95"]
        assert lo < r["auroc"] < hi and hi - lo < 0.2
    assert np.isclose(m["macro"]["auroc"], np.mean([m["per_class"][k]["auroc"] for k in "abc"]))
    assert np.isclose(m["micro"]["auroc"], roc_auc_score(y.ravel(), probs.ravel()))


def test_class_without_positives_is_reported_not_crashed():
    y, logits = noisy_scores(c=2)
    y[:, 1] = 0
    m = compute_metrics(y, probs_from_logits(logits, "multilabel"), ["a", "b"], "multilabel")
    assert m["per_class"]["b"]["auroc"] is None and m["macro"]["auroc"] == m["per_class"]["a"]["auroc"]


def test_multiclass_accuracy_and_confusion():
    y = np.eye(3)[[0, 0, 1, 1, 2, 2]]
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    m = compute_metrics(y, probs, ["x", "y", "z"], "multiclass")
    assert np.isclose(m["accuracy"], 4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_thresholds_youden_and_target_sensitivity():
    y, logits = noisy_scores(n=1000, c=1, seed=1)
    probs = probs_from_logits(logits, "multilabel")
    (t_j,) = choose_thresholds(y, probs, "youden")
    (t_s,) = choose_thresholds(y, probs, "sensitivity", 0.97)
    sens = ((probs[:, 0] >= t_s) & (y[:, 0] == 1)).sum() / y.sum()
    assert sens >= 0.97 and t_s < t_j


def test_f1_threshold_is_the_best_f1_and_flags_fewer_negatives_of_a_rare_finding():
    rng = np.random.default_rng(3)
    y = (rng.random((2000, 1)) < 0.04).astype(int)  # 4% prevalence, like most NIH findings
    probs = probs_from_logits(y * 1.5 + rng.normal(-3, 1, y.shape), "multilabel")
    (t_f1,) = choose_thresholds(y, probs, "f1")
    (t_j,) = choose_thresholds(y, probs, "youden")

    def f1(t):
        return f1_score(y[:, 0], probs[:, 0] >= t)

    assert all(f1(t_f1) >= f1(t) - 1e-12 for t in np.unique(probs))
    false_positives = [int(((probs[:, 0] >= t) & (y[:, 0] == 0)).sum()) for t in (t_f1, t_j)]
    assert t_f1 > t_j and false_positives[0] < false_positives[1] / 3


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(0, 2, (3000, 2))
    y = (rng.random(true_logits.shape) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = true_logits * 4
    t = fit_temperature(overconfident, y, "multilabel")
    assert 3 < t < 5
    before = expected_calibration_error(y, probs_from_logits(overconfident, "multilabel"), "multilabel")
    after = expected_calibration_error(y, probs_from_logits(overconfident, "multilabel", t), "multilabel")
    assert after < before / 2
    metrics, _ = evaluate_logits(overconfident, y, ["a", "b"], "multilabel")
    assert metrics["calibration"]["ece_after"] < metrics["calibration"]["ece_before"]
    assert metrics["calibration"]["temperature"] == t
