"""The input gate on real images: what a chest model and a brain-MRI model accept, per image set.

    .venv/bin/python benchmarks/input_gate.py

Sets marked "fit" were used to fit the gate (in-sample, shown for completeness); "held-out" sets are
images of a fitted kind the gate never saw; "held-out kind" sets are kinds of image it never saw at all.
Pixels only: DICOM tags, which refuse more (the tibia's EXTREMITY, MR, lateral views), are not used here.
"""

from __future__ import annotations

import time

import numpy as np

from _common import DATA, machine, table
from medai import gate
from medai.training.gate import features_of, image_sets


def main() -> None:
    g = gate.input_gate()
    rows, per_kind = [], {}
    t_features, n_images = 0.0, 0
    for s in image_sets(DATA):
        if not s.loaders:
            continue
        t0 = time.perf_counter()
        feats = features_of(s)
        t_features += time.perf_counter() - t0
        n_images += len(feats)
        chest = np.array([v.accepted for v in g.judge_pixels(feats, "chest_xray")])
        brain = np.array([v.accepted for v in g.judge_pixels(feats, "brain_mri")])
        rows.append([s.name, s.kind, s.role, len(feats), f"{chest.mean():.1%}", f"{brain.mean():.1%}"])
        if s.role != "fit":
            per_kind.setdefault((s.kind, s.role), []).append((chest, brain))
    print(f"## Input gate ({machine()})\n")
    print(table(rows, ["image set", "kind", "role", "images", "chest model accepts", "brain-MRI model accepts"]))
    summary = []
    for (kind, role), parts in sorted(per_kind.items()):
        chest = np.concatenate([c for c, _ in parts])
        brain = np.concatenate([b for _, b in parts])
        summary.append([kind, role, len(chest), f"{1 - chest.mean():.1%}", f"{1 - brain.mean():.1%}"])
    print("\nHeld-out images only (refusal rates; targets: chest films refused <= 1% by the chest model, "
          "everything else >= 99%)\n")
    print(table(summary, ["kind", "role", "images", "refused by the chest model", "refused by the brain-MRI model"]))
    print(f"\nFeature extraction: {1000 * t_features / max(n_images, 1):.1f} ms per image (batches of 32, "
          "including decoding)")


if __name__ == "__main__":
    main()
