"""Heatmaps for all findings of one image: medai's shared pass vs pytorch-grad-cam once per finding.

    .venv/bin/python benchmarks/cam_speed.py [--size 224]
"""

from __future__ import annotations

import argparse
import copy

import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from _common import DATA, machine, median_time, table
from medai.data.io import decode_image
from medai.data.transforms import PreprocessSpec, preprocess
from medai.explain.cam import compute_cams
from medai.models import create_model


def library_per_finding(model, batch, classes):
    ref = copy.deepcopy(model)
    reshape = ref.cam_reshape_transform if ref.uses_token_grid else None
    with torch.enable_grad():
        cam = GradCAM(model=ref, target_layers=ref.cam_target_layers(), reshape_transform=reshape)
        try:
            return [cam(batch, [ClassifierOutputTarget(c)]) for c in classes]
        finally:
            cam.activations_and_grads.release()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    pixels = decode_image(sorted((DATA / "nih-cxr14-sample/fullres").glob("*.png"))[0]).pixels
    batch = preprocess(pixels, PreprocessSpec(args.size)).unsqueeze(0)
    rows = []
    for name, kwargs in (("densenet121", {}), ("hybrid_cnn_transformer", {"image_size": args.size}),
                         ("vit_small", {"image_size": args.size})):
        model = create_model(name, 14, **kwargs).eval()
        for n in (1, 4, 14):
            classes = list(range(n))
            ours = median_time(lambda: compute_cams(model, batch, classes, "gradcam", pixels.shape), args.repeats)
            lib = median_time(lambda: library_per_finding(model, batch, classes), args.repeats)
            rows.append([name, n, ours, lib, lib / ours])
    print(f"## Heatmaps for N findings, GradCAM, {args.size} px, 1024-px NIH PNG ({machine()})\n")
    print("medai = one forward, closed-form gradients for linear heads (DenseNet) or one batched "
          "backward for all findings (hybrid, ViT), heatmaps resized to the original 1024 px; library = pytorch-grad-cam GradCAM "
          "called once per finding (forward + backward each, heatmap at model size). Median seconds.\n")
    print(table(rows, ["architecture", "findings", "medai s", "library per finding s", "speed-up"]))


if __name__ == "__main__":
    main()
