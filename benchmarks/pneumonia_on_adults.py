"""How the pneumonia models do on adults: NIH films labelled Pneumonia or Consolidation against No Finding.

    .venv/bin/python benchmarks/pneumonia_on_adults.py --checkpoint models/pneumonia-hybrid.safetensors \
        [--checkpoint models/nih14-efficientnet-lite0.safetensors ...]

Kermany's validation films are all children from one hospital; this asks the question a reader of adult films
would ask. Two sets of adult films no model here trained on: the validation split of `nih-cxr14-train-224` (NIH
patients, the default seeded patient split; `data.extra_train` draws only from the training split) and
`nih-cxr14-sample`. Positive: a film labelled Pneumonia or Consolidation (text-mined labels, about 90% right);
negative: a No Finding film; films with other findings only are left out. Score: a pneumonia model's PNEUMONIA
probability; a 14-finding model's larger of Pneumonia and Consolidation. AUROC with a 95% bootstrap interval.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

from _common import DATA, machine, table

from medai.config import DataConfig
from medai.data.datasets import Record, load_records
from medai.evaluation.metrics import bootstrap_auroc_ci
from medai.inference import Predictor

POSITIVE = ("Pneumonia", "Consolidation")


def adult_films(root: str, split: str | None) -> tuple[list[Record], np.ndarray]:
    recset = load_records(DataConfig(root=str(DATA / root), include_no_finding=True))
    col = {lab: i for i, lab in enumerate(recset.labels)}
    pos, neg = [], []
    for r in recset.records:
        if split and r.split != split:
            continue
        if any(r.target[col[p]] for p in POSITIVE):
            pos.append(r)
        elif r.target[col["No Finding"]]:
            neg.append(r)
    return pos + neg, np.r_[np.ones(len(pos)), np.zeros(len(neg))]


def score(predictor: Predictor, records: list[Record]) -> np.ndarray:
    cols = [predictor.labels.index(lab) for lab in ("PNEUMONIA", *POSITIVE) if lab in predictor.labels]
    predictions = predictor.predict_many([r.source for r in records])
    return np.array([max(p.probabilities[c] for c in cols) for p in predictions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True)
    args = parser.parse_args()
    sets = {"nih-cxr14-train-224, val split": adult_films("nih-cxr14-train-224", "val"),
            "nih-cxr14-sample": adult_films("nih-cxr14-sample", None)}
    rows = []
    for checkpoint in args.checkpoint:
        predictor = Predictor(checkpoint)
        for name, (records, y) in sets.items():
            probs = score(predictor, records)
            (ci,) = bootstrap_auroc_ci(y[:, None], probs[:, None], n_boot=1000)
            rows.append([checkpoint.rsplit("/", 1)[-1], name, int(y.sum()), int(len(y) - y.sum()),
                         roc_auc_score(y, probs), f"{ci[0]:.3f}-{ci[1]:.3f}"])
    print(f"## Pneumonia or Consolidation vs No Finding on NIH adults ({machine()})\n")
    print(table(rows, ["checkpoint", "films", "positive", "negative", "AUROC", "95% CI"]))


if __name__ == "__main__":
    main()
