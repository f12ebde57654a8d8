"""Faithfulness (ROAD) per CAM method, and localisation against radiologists' boxes (pointing game, IoU).

    .venv/bin/python benchmarks/cam_quality.py --checkpoint results/runs/<nih run>/best.safetensors [--images 40]

ROAD combined (Rong et al. 2022, pytorch-grad-cam's implementation): the mean of the confidence change
when the least relevant pixels are imputed away minus when the most relevant are, over percentiles
20-80; higher = more faithful. Pointing game: the heatmap's peak falls inside a box of that finding
(strict), and the same within the field's tolerance (Zhang et al. 2016, TorchRay's `PointingGame`: the peak
within 15 pixels of the box), here 15 pixels of NIH's 1024-pixel originals, 7.5 at the 512-pixel copies.
IoU: heatmap thresholded at 0.5 of its peak vs the box.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import ROADCombined

from _common import DATA, machine, table
from medai.data.io import decode_image
from medai.data.transforms import preprocess
from medai.explain.cam import CAM_METHODS, compute_cams
from medai.inference import Predictor

BOX_TO_NIH = {"Infiltrate": "Infiltration"}
TOLERANCE_PX, ORIGINAL_PX = 15, 1024  # pointing-game tolerance, in pixels of NIH's original films


def distance_to_box(px: float, py: float, x: float, y: float, w: float, h: float) -> float:
    """Euclidean distance from a point to an axis-aligned box (0 inside it)."""
    return float(np.hypot(max(x - px, 0.0, px - (x + w)), max(y - py, 0.0, py - (y + h))))


def scores(dists: list[float], ious: list[float]) -> list[object]:
    """Boxes, pointing game strict and within the tolerance, mean IoU; distances in original-film pixels."""
    d = np.asarray(dists)
    return [len(d), float(np.mean(d == 0)), float(np.mean(d < TOLERANCE_PX)), float(np.mean(ious))]


class ProbabilityTarget:
    """The calibrated probability of one finding, as ROAD's score."""

    def __init__(self, index: int, kind: str):
        self.index, self.kind = index, kind

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        z = output[..., self.index] if self.kind == "multilabel" else torch.softmax(output, -1)[..., self.index]
        return torch.sigmoid(z) if self.kind == "multilabel" else z


def road(predictor: Predictor, methods: list[str], n_images: int, folder: str) -> list[list[object]]:
    files = sorted(p for p in (DATA / folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[:: max(1, len(files) // n_images)][:n_images]  # spread over the folder (all classes)
    metric = ROADCombined(percentiles=[20, 40, 60, 80])
    scores = defaultdict(list)
    for f in files:
        batch = preprocess(decode_image(f).pixels, predictor.spec).unsqueeze(0)
        probs = predictor.predict_tensor(batch)[0]
        c = int(np.argmax(probs))  # the model's most probable finding
        for method in methods:
            cam = compute_cams(predictor.model, batch, [c], method, softmax=predictor.kind == "multiclass").heatmaps[c]
            s = metric(batch, cam[None], [ProbabilityTarget(c, predictor.kind)], predictor.model)
            scores[method].append(float(np.ravel(s)[0]))
    arch = predictor.ckpt.card["architecture"]
    return [[arch, folder, m, float(np.mean(v)), float(np.std(v) / np.sqrt(len(v))), len(v)]
            for m, v in sorted(scores.items(), key=lambda kv: -np.mean(kv[1]))]


def localisation(predictor: Predictor, methods: list[str]) -> list[list[object]]:
    root = DATA / "nih-cxr14-bbox"
    boxes = defaultdict(list)
    for r in csv.DictReader(open(root / "bboxes_512px.csv")):
        boxes[r["Image Index"]].append((BOX_TO_NIH.get(r["Finding Label"], r["Finding Label"]),
                                        *(float(r[k]) for k in ("x", "y", "w", "h"))))
    dists = defaultdict(list)  # peak-to-box distance, in pixels of the original film
    ious = defaultdict(list)
    image_dir = root / "images" if (root / "images").is_dir() else root
    for name, items in boxes.items():
        path = image_dir / name
        if not path.exists():
            continue
        image = decode_image(path)
        batch = preprocess(image.pixels, predictor.spec).unsqueeze(0)
        classes = sorted({predictor.labels.index(lab) for lab, *_ in items if lab in predictor.labels})
        for method in methods:
            cams = compute_cams(predictor.model, batch, classes, method, image.pixels.shape,
                                softmax=predictor.kind == "multiclass").heatmaps
            for lab, x, y, w, h in items:
                if lab not in predictor.labels:
                    continue
                heat = cams[predictor.labels.index(lab)]
                py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
                dists[(lab, method)].append(distance_to_box(px, py, x, y, w, h) * ORIGINAL_PX / heat.shape[0])
                box = np.zeros(heat.shape, bool)
                box[int(y): int(y + h), int(x): int(x + w)] = True
                pred = heat >= 0.5 * heat.max() if heat.max() > 0 else np.zeros_like(box)
                ious[(lab, method)].append((pred & box).sum() / max((pred | box).sum(), 1))

    rows = [[lab, method, *scores(v, ious[(lab, method)])] for (lab, method), v in sorted(dists.items())]
    for method in methods:
        pooled = [[x for (lab, m), v in d.items() if m == method for x in v] for d in (dists, ious)]
        rows.append(["all findings", method, *scores(*pooled)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--images", type=int, default=40,
                        help="images for ROAD (0: no ROAD; at 224 px its imputation takes minutes per image)")
    parser.add_argument("--road-images", default="nih-cxr14-sample/images",
                        help="folder under MEDAI_DATA_DIR whose images ROAD uses")
    parser.add_argument("--methods", default="gradcam,gradcam++,hirescam,eigencam,layercam",
                        help="comma-separated; scorecam is slow on CPU")
    parser.add_argument("--skip-localisation", action="store_true")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}")
    print(f"## CAM faithfulness and localisation ({machine()})\n")
    header = ["architecture", "images from", "method", "ROAD combined", "SE", "images"]
    if args.images:
        print(f"ROAD combined on {args.images} real images, the most probable finding (mean, SE):\n")
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    loc_rows = []
    for ckpt in args.checkpoint:  # rows print as each model finishes, so a time limit keeps them
        predictor = Predictor(ckpt)
        if args.images:
            print(table(road(predictor, methods, args.images, args.road_images), header).split("\n", 2)[2],
                  flush=True)
        if not args.skip_localisation and "Cardiomegaly" in predictor.labels:
            loc_rows += [[predictor.ckpt.card["architecture"], *row] for row in localisation(predictor, methods)]
    if loc_rows:
        print("\nnih-cxr14-bbox: pointing game and IoU (heatmap >= 0.5 of peak) per finding:\n")
        print(table(loc_rows, ["architecture", "finding", "method", "boxes", "pointing game",
                               f"within {TOLERANCE_PX} px", "IoU"]))


if __name__ == "__main__":
    main()
