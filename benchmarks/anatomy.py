"""Anatomy map on real images: lung-field success rate, CTR vs Cardiomegaly, refusal of non-chest inputs.

    .venv/bin/python benchmarks/anatomy.py
"""

from __future__ import annotations

import csv

import numpy as np
from sklearn.metrics import roc_auc_score

from _common import DATA, machine, table
from medai.data.io import decode_image
from medai.explain.anatomy import segment_chest


def main() -> None:
    root = DATA / "nih-cxr14-sample"
    rows = [r for r in csv.DictReader(open(root / "Data_Entry_2017_v2020.csv"))]
    results = []
    for view in ("PA", "AP"):
        subset = [r for r in rows if r["View Position"] == view]
        found, ctr, y = 0, [], []
        for r in subset:
            a = segment_chest(decode_image(root / "images" / r["Image Index"]).pixels, view=view)
            found += a.applicable
            labels = r["Finding Labels"].split("|")
            if a.applicable and a.ctr and ("Cardiomegaly" in labels or labels == ["No Finding"]):
                ctr.append(a.ctr)
                y.append("Cardiomegaly" in labels)
        auroc = roc_auc_score(y, ctr) if 0 < sum(y) < len(y) else float("nan")
        ctr_arr, y_arr = np.array(ctr), np.array(y)
        results.append([view, len(subset), f"{found / len(subset):.1%}", auroc, sum(y), len(y) - sum(y),
                        float(np.median(ctr_arr[y_arr])) if y_arr.any() else float("nan"),
                        float(np.median(ctr_arr[~y_arr]))])
    print(f"## Anatomy map ({machine()})\n")
    print("nih-cxr14-sample; lung fields = two plausible components; CTR AUROC = Cardiomegaly vs No Finding\n")
    print(table(results, ["view", "images", "lung fields found", "CTR AUROC", "cardiomegaly", "no finding",
                          "median CTR cardio", "median CTR normal"]))
    others = []
    mri = DATA / "brain-tumor-mri"
    for name, files in (("brain MRI glioma + meningioma (used to choose MAX_DARK_FRAME)",
                         sorted(mri.glob("glioma/*.jpg")) + sorted(mri.glob("meningioma/*.jpg"))),
                        ("brain MRI notumor + pituitary (held out)",
                         sorted(mri.glob("notumor/*.jpg")) + sorted(mri.glob("pituitary/*.jpg"))),
                        ("nih-cxr14-train-224, first 600 (chest)",
                         sorted((DATA / "nih-cxr14-train-224" / "images").glob("*"))[:600]),
                        ("kermany-pneumonia val (chest, paediatric)", sorted((DATA / "kermany-pneumonia/val").rglob("*.jpeg")))):
        accepted = sum(segment_chest(decode_image(f).pixels).applicable for f in files)
        others.append([name, len(files), f"{accepted / len(files):.1%}"])
    tibia = decode_image(DATA / "dicom/pydicom_data_RG3_J2KR.dcm")
    others.append(["tibia DICOM (BodyPartExamined EXTREMITY)", 1,
                   f"{segment_chest(tibia.pixels, tibia.meta.body_part).applicable:.0%}"])
    print()
    print(table(others, ["input", "images", "anatomy map given"]))


if __name__ == "__main__":
    main()
