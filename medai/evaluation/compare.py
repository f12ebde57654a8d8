"""Is model B really better than model A on the same images? Paired AUROC differences.

Per finding: DeLong's test for two correlated ROC curves (DeLong, DeLong and Clarke-Pearson, Biometrics 1988;
the fast midrank form of Sun and Xu, IEEE SPL 2014), as radiology papers and R's pROC (``roc.test``) report
it: the difference, its 95% CI and a two-sided p. The macro difference (the mean over findings) has no
closed form, because the findings share images: there a paired bootstrap over images resamples both models'
scores together. Scores must be those of the same images in the same order; ``align`` does that from two
prediction tables by image id.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from medai.errors import MedaiError
from medai.evaluation.report import PredictionTable

Z95 = float(norm.ppf(0.975))


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: for each positive the share of negatives it outranks (ties half),
    for each negative the share of positives that outrank it."""
    m, n = len(pos), len(neg)
    ranks_all = rankdata(np.concatenate([pos, neg]))
    v10 = (ranks_all[:m] - rankdata(pos)) / n
    v01 = 1.0 - (ranks_all[m:] - rankdata(neg)) / m
    return v10, v01


def delong_paired(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, float]:
    """AUROC of A and of B on binary labels ``y``, B - A, its 95% CI and DeLong's two-sided p."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise MedaiError("a paired AUROC test needs positives and negatives")
    comps = [_placements(np.asarray(s, float)[y], np.asarray(s, float)[~y]) for s in (scores_a, scores_b)]
    auc_a, auc_b = (float(v10.mean()) for v10, _ in comps)
    s10 = np.cov(np.vstack([c[0] for c in comps]))
    s01 = np.cov(np.vstack([c[1] for c in comps]))
    cov = s10 / int(y.sum()) + s01 / int((~y).sum())
    var = max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)
    diff = auc_b - auc_a
    se = var ** 0.5
    p = 1.0 if se == 0 else float(2 * norm.sf(abs(diff) / se))
    return {"auroc_a": auc_a, "auroc_b": auc_b, "diff": diff,
            "ci95": [float(diff - Z95 * se), float(diff + Z95 * se)], "p": p}


def _resampled_auroc(y: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney with midranks) of every resample ``idx`` (B x N); NaN where one class is absent."""
    yb = y[idx]
    ranks = rankdata(scores[idx], axis=1)
    n1 = yb.sum(axis=1)
    n0 = yb.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * yb).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def paired_comparison(y_true: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, labels: list[str],
                      n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """B against A on the same N images (N x C labels and scores): per finding DeLong, and the macro AUROC
    difference with a paired-bootstrap 95% CI and p (normal approximation from the bootstrap SE)."""
    y_true = np.asarray(y_true).astype(int)
    probs_a, probs_b = np.asarray(probs_a, float), np.asarray(probs_b, float)
    if not (y_true.shape == probs_a.shape == probs_b.shape) or y_true.shape[1] != len(labels):
        raise MedaiError(f"labels {y_true.shape}, scores {probs_a.shape} and {probs_b.shape} differ in shape "
                         f"(or from {len(labels)} labels)")
    defined = [c for c in range(len(labels)) if 0 < y_true[:, c].sum() < len(y_true)]
    if not defined:
        raise MedaiError("no finding has both positives and negatives in these images")
    per_class = {labels[c]: {**delong_paired(y_true[:, c], probs_a[:, c], probs_b[:, c]),
                             "support": int(y_true[:, c].sum())} for c in defined}
    idx = np.random.default_rng(seed).integers(0, len(y_true), (n_boot, len(y_true)))
    # per resample, the mean over the findings with both classes in it, as `macro` takes it
    auc = np.stack([[_resampled_auroc(y_true[:, c], p[:, c], idx) for c in defined] for p in (probs_a, probs_b)])
    deltas = np.nanmean(auc[1] - auc[0], axis=0)  # 2 x F x B -> B
    mean_a = float(np.mean([per_class[labels[c]]["auroc_a"] for c in defined]))
    mean_b = float(np.mean([per_class[labels[c]]["auroc_b"] for c in defined]))
    se = float(np.std(deltas, ddof=1)) if n_boot > 1 else 0.0
    diff = mean_b - mean_a
    macro = {"auroc_a": mean_a, "auroc_b": mean_b, "diff": diff,
             "ci95": [float(np.quantile(deltas, 0.025)), float(np.quantile(deltas, 0.975))],
             "p": 1.0 if se == 0 else float(2 * norm.sf(abs(diff) / se)), "findings": len(defined)}
    return {"n": int(len(y_true)), "n_boot": int(n_boot), "per_class": per_class, "macro": macro}


def align(ids_a: list[str], ids_b: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The images both tables score (by id, in A's order) and their row indices in A and in B."""
    where_b = {i: k for k, i in enumerate(ids_b)}
    if len(where_b) != len(ids_b) or len(set(ids_a)) != len(ids_a):
        raise MedaiError("an image id occurs twice in one prediction table")
    common = [i for i in ids_a if i in where_b]
    if not common:
        raise MedaiError("the two prediction tables share no image id: were they made on the same images?")
    where_a = {i: k for k, i in enumerate(ids_a)}
    return common, np.array([where_a[i] for i in common]), np.array([where_b[i] for i in common])


def compare_tables(a: PredictionTable, b: PredictionTable, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """B against A on the images and findings both tables score; the labels come from whichever table has
    them, and two tables that both have them must agree."""
    labels = [lab for lab in a.labels if lab in b.labels]
    if not labels:
        raise MedaiError(f"the two tables share no finding (A: {', '.join(a.labels)}; B: {', '.join(b.labels)})")
    ids, rows_a, rows_b = align(a.ids, b.ids)
    cols_a = [a.labels.index(lab) for lab in labels]
    cols_b = [b.labels.index(lab) for lab in labels]
    truths = [t[rows][:, cols] for t, rows, cols in ((a.targets, rows_a, cols_a), (b.targets, rows_b, cols_b))
              if t is not None]
    if not truths:
        raise MedaiError("neither table has the true labels (true_<label> columns)")
    if len(truths) == 2 and not np.array_equal(*truths):
        raise MedaiError("the two tables disagree on the true labels of the same images: made from different data?")
    out = paired_comparison(truths[0], a.probs[rows_a][:, cols_a], b.probs[rows_b][:, cols_b], labels,
                            n_boot=n_boot, seed=seed)
    out["only_in_a"], out["only_in_b"] = len(a.ids) - len(ids), len(b.ids) - len(ids)
    return out
