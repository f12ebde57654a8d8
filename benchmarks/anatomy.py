"""Anatomy maps on real images, learned (JSRT/SCR-trained network) vs classical (thresholds and shape priors):
Dice against manual masks, CTR vs Cardiomegaly on NIH PA films, and where a pneumonia model's heatmap falls.

    .venv/bin/python benchmarks/anatomy.py [--quick]
"""

from __future__ import annotations

import csv
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from _common import DATA, ROOT, machine, table
from medai.data.io import decode_image
from medai.explain.anatomy import attention_shares, segment_chest
from medai.explain.segmentation import STRUCTURES
from medai.training.segmentation import cases, dice, load_case

METHODS = ("learned", "classical")


def dice_table() -> list[list]:
    root = DATA / "jsrt-scr-masks"
    rows = []
    for method in METHODS:
        scores = {s: [] for s in STRUCTURES}
        failed = 0
        for case in cases(root, "test"):
            image, truth = load_case(root, case)
            a = segment_chest(image, method=method)
            if not a.applicable:
                failed += 1
                pred = {s: np.zeros_like(truth[0], dtype=bool) for s in STRUCTURES}
            else:
                pred = {"right_lung": a.right_lung, "left_lung": a.left_lung, "heart": a.heart}
            for i, s in enumerate(STRUCTURES):
                scores[s].append(dice(pred[s], truth[i] > 0.5))
        lungs = scores["right_lung"] + scores["left_lung"]
        rows.append([method, len(scores["heart"]), failed, float(np.mean(lungs)), float(np.mean(scores["heart"])),
                     float(np.percentile(lungs, 5)), float(np.percentile(scores["heart"], 5))])
    return rows


def _nih_pa(name: str) -> list[dict]:
    root = DATA / name
    return [{**r, "path": root / "images" / r["Image Index"]} for r in csv.DictReader(open(root / "Data_Entry_2017_v2020.csv"))
            if r["View Position"] == "PA"]


def ctr_table(quick: bool) -> list[list]:
    films = {"sample": _nih_pa("nih-cxr14-sample"), "bbox": _nih_pa("nih-cxr14-bbox")}
    if quick:
        films = {k: v[:80] for k, v in films.items()}
    rows = []
    for method in METHODS:
        ctr: dict[str, list] = {}
        shown = total = 0
        for source, entries in films.items():
            for r in entries:
                a = segment_chest(decode_image(r["path"]).pixels, view="PA", method=method)
                total += 1
                reliable = a.applicable and a.ctr is not None and a.ctr_detail.get("confidence") != "low"
                shown += reliable
                labels = r["Finding Labels"].split("|")
                group = "cardio" if "Cardiomegaly" in labels else "normal" if labels == ["No Finding"] else "other"
                ctr.setdefault(f"{source}-{group}", []).append(a.ctr if a.applicable and a.ctr else np.nan)

        def auroc(pos: list[str], neg: list[str]) -> float:
            p = [v for k in pos for v in ctr.get(k, [])]
            n = [v for k in neg for v in ctr.get(k, [])]
            y, s = np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n]
            ok = ~np.isnan(s)
            return float(roc_auc_score(y[ok], s[ok])) if 0 < y[ok].sum() < ok.sum() else float("nan")
        rows.append([method, total, f"{shown / total:.1%}", auroc(["sample-cardio"], ["sample-normal"]),
                     auroc(["sample-cardio", "bbox-cardio"], ["sample-normal"]),
                     auroc(["bbox-cardio"], ["bbox-other"])])
    return rows


def shares_table(quick: bool) -> list[list]:
    from medai.analysis import explain_image
    from medai.inference import Predictor

    predictor = Predictor(ROOT / "models" / "pneumonia-hybrid.safetensors")
    files = sorted((DATA / "kermany-pneumonia" / "val").rglob("*.jpeg"))[::(20 if quick else 5)]
    inside = {m: [] for m in METHODS}
    for f in files:
        image = decode_image(f)
        exp = explain_image(predictor, image, ["PNEUMONIA"])
        heat = exp.heatmaps.small["PNEUMONIA"]
        for method in METHODS:
            a = segment_chest(image.pixels, method=method)
            if a.applicable:
                s = attention_shares(heat, a)
                inside[method].append(s["right_lung"] + s["left_lung"] + s["heart"])
    return [[m, len(files), len(v), float(np.mean(v)) if v else float("nan"),
             f"{np.mean(np.array(v) >= 0.5):.1%}" if v else "-"] for m, v in inside.items()]


def main() -> None:
    quick = "--quick" in sys.argv
    print(f"## Anatomy maps: learned vs classical ({machine()})\n")
    print("JSRT/SCR held-out test split (patient-disjoint); Dice per structure, mean and 5th percentile\n")
    print(table(dice_table(), ["method", "films", "no map", "lung Dice", "heart Dice", "lung Dice p5", "heart Dice p5"]))
    print("\nCTR AUROC for Cardiomegaly on NIH PA films (sample: vs No Finding; bbox: vs the other boxed findings, "
          "as the bbox set has no 'No Finding' film); 'reliable CTR' = map given with normal confidence\n")
    print(table(ctr_table(quick), ["method", "PA films", "reliable CTR", "sample AUROC", "sample+bbox cardio vs "
                                   "sample normal", "bbox AUROC"]))
    print("\nShare of the shipped pneumonia-hybrid's PNEUMONIA heatmap (its default CAM) inside the lungs and heart, "
          "Kermany val (paediatric)\n")
    print(table(shares_table(quick), ["anatomy", "films", "with a map", "mean share inside", ">= 50% inside"]))


if __name__ == "__main__":
    main()
