"""Analyze latency per architecture, step by step, against the pipeline users write today
(torchxrayvision preprocessing + pytorch-grad-cam GradCAM for one finding, same DenseNet121 architecture).

    .venv/bin/python benchmarks/analyze_latency.py [--repeats 5]        (make bench installs torchxrayvision)

Speed does not depend on the weights, so the three architectures are freshly initialised at 224 px with the
14 NIH ChestX-ray14 labels (DenseNet121 has 18 outputs in torchxrayvision); the shipped default chest model
(``catalog.DEFAULT_MODEL``, EfficientNet-Lite0) is measured with its own weights, card and default method.
Images: a 1024-px NIH PNG and the 1955x1841 uncompressed DICOM from ../shared/data. Medians of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from _common import DATA, machine, median_time, table
from medai.api import Options, analyze_one
from medai.imaging import DISPLAY_MAX_SIDE, display_size, resize_float, resize_heatmap
from medai.analysis import default_method
from medai.catalog import DEFAULT_MODEL, ModelEntry, list_models
from medai.data.io import decode_image
from medai.data.transforms import PreprocessSpec, preprocess
from medai.explain.anatomy import segment_chest
from medai.explain.cam import compute_cams
from medai.explain.overlay import render_overlay
from medai.inference import Predictor
from medai.models import create_model
from medai.models.checkpoint import new_card, read_card, save_checkpoint

NIH14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
ARCHITECTURES = (("densenet121", {}), ("hybrid_cnn_transformer", {"image_size": 224}), ("vit_small", {"image_size": 224}))


def images() -> list[tuple[str, Path]]:
    png = sorted((DATA / "nih-cxr14-sample" / "fullres").glob("*.png"))[0]
    return [("NIH PNG 1024x1024", png), ("DICOM 1955x1841", DATA / "dicom" / "pydicom_data_RG1_UNCR.dcm")]


def predictor_for(name: str, kwargs: dict, folder: Path) -> tuple[Predictor, ModelEntry]:
    torch.manual_seed(0)
    model = create_model(name, len(NIH14), **kwargs).eval()
    card = new_card(name, kwargs, "multilabel", NIH14, PreprocessSpec(224).to_dict(), body_part="chest")
    path = save_checkpoint(model, card, folder / f"{name}.safetensors")
    return Predictor(path), ModelEntry(name, path, "benchmark", read_card(path))


def shipped_default() -> tuple[Predictor, ModelEntry]:
    entry = next(e for e in list_models(include_runs=False)[0] if e.name == DEFAULT_MODEL)
    return Predictor(entry.path), entry


def ours(predictor: Predictor, entry: ModelEntry, path: Path, repeats: int) -> dict[str, float]:
    data = path.read_bytes()
    img = decode_image(data)
    batch = preprocess(img.pixels, predictor.spec).unsqueeze(0)
    method = default_method(predictor)
    small = compute_cams(predictor.model, batch, [0], method).heatmaps[0]
    heat = resize_heatmap(small, img.pixels.shape)
    anatomy = segment_chest(img.pixels, img.meta.body_part, img.meta.view, img.meta.modality)
    all_labels = list(range(len(NIH14)))
    shape = display_size(img.pixels.shape)

    def overlay_on_page() -> None:  # what the Analyze page renders: the overlay at display size
        render_overlay(resize_float(img.pixels, shape), resize_heatmap(small, shape), 0.45, anatomy)
    return {
        "decode": median_time(lambda: decode_image(data), repeats),
        "preprocess": median_time(lambda: preprocess(img.pixels, predictor.spec), repeats),
        "forward": median_time(lambda: predictor.predict_tensor(batch), repeats),
        "heatmap 1": median_time(lambda: compute_cams(predictor.model, batch, [0], method), repeats),
        "heatmaps 14": median_time(lambda: compute_cams(predictor.model, batch, all_labels, method), repeats),
        "anatomy": median_time(lambda: segment_chest(img.pixels, img.meta.body_part, img.meta.view,
                                                     img.meta.modality), repeats),
        "overlay": median_time(lambda: render_overlay(img.pixels, heat, 0.45, anatomy), repeats),
        "page overlay": median_time(overlay_on_page, repeats),
        # the whole API/Analyze path from bytes: decode, predict, heatmaps, anatomy, attention shares, JSON
        "end to end 1": median_time(lambda: analyze_one(predictor, entry, data, path.name,
                                                        Options(findings=[NIH14[0]])), repeats),
        "end to end 14": median_time(lambda: analyze_one(predictor, entry, data, path.name, Options(findings="all")),
                                     repeats),
    }


def theirs(path: Path, repeats: int) -> tuple[dict[str, float], Callable[[], object]]:
    """torchxrayvision's README pipeline + pytorch-grad-cam, as a user would write it today: the median of
    each step, and the whole pipeline as one call."""
    import skimage.io
    import torchvision
    import torchxrayvision as xrv
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])

    def read() -> np.ndarray:
        if path.suffix == ".dcm":
            return xrv.utils.read_xray_dcm(str(path))  # already in [-1024, 1024]
        img = xrv.datasets.normalize(skimage.io.imread(str(path)), 255)
        return img.mean(2) if img.ndim == 3 else img

    img = read()
    x = torch.from_numpy(transform(img[None, ...])).float()[None]
    rgb = np.repeat(((x[0, 0].numpy() + 1024) / 2048)[..., None], 3, axis=-1).clip(0, 1).astype(np.float32)

    def gradcam(inputs: torch.Tensor = x) -> np.ndarray:
        with GradCAM(model=model, target_layers=[model.features[-1]]) as cam:
            return cam(input_tensor=inputs, targets=[ClassifierOutputTarget(0)])[0]

    def predict() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    def pipeline() -> np.ndarray:
        raw = read()
        x_ = torch.from_numpy(transform(raw[None, ...])).float()[None]
        with torch.inference_mode():
            model(x_)
        grey = ((x_[0, 0].numpy() + 1024) / 2048).clip(0, 1).astype(np.float32)
        return show_cam_on_image(np.repeat(grey[..., None], 3, axis=-1), gradcam(x_), use_rgb=True)

    heat = gradcam()
    steps = {"decode": median_time(read, repeats), "preprocess": median_time(lambda: transform(img[None, ...]), repeats),
             "forward": median_time(predict, repeats), "heatmap 1": median_time(gradcam, repeats),
             "overlay": median_time(lambda: show_cam_on_image(rgb, heat, use_rgb=True), repeats)}
    return steps, pipeline


def interleaved_ratio(ours_fn: Callable[[], object], theirs_fn: Callable[[], object], rounds: int) -> float:
    """The median over ``rounds`` of ours / theirs timed back to back, so that this machine's drift (theirs
    moved 345-531 ms between runs) falls on both sides of each ratio."""
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ours_fn()
        t1 = time.perf_counter()
        theirs_fn()
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shipped-only", action="store_true", help="only the shipped default model (and theirs)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of ours (14 findings) and theirs")
    args = ap.parse_args()
    steps = ["decode", "preprocess", "forward", "heatmap 1", "heatmaps 14", "anatomy", "overlay", "page overlay"]
    rows, compare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        subjects = [] if args.shipped_only else [(arch, *predictor_for(arch, kwargs, Path(tmp)))
                                                 for arch, kwargs in ARCHITECTURES]
        subjects.append((f"{DEFAULT_MODEL} (shipped)", *shipped_default()))
        for name, predictor, entry in subjects:
            for label, path in images():
                t = ours(predictor, entry, path, args.repeats)
                ends = [t["end to end 1"], t["end to end 14"]]
                rows.append([name, label] + [f"{1000 * t[s]:.0f}" for s in steps] + [f"{1000 * e:.0f}" for e in ends])
                if name == "densenet121" or entry.source == "shipped":
                    x, pipeline = theirs(path, args.repeats)  # measured beside each of ours: this machine drifts
                    their_total = sum(x.values())
                    data = path.read_bytes()
                    ratio = interleaved_ratio(lambda: analyze_one(predictor, entry, data, path.name,
                                                                  Options(findings="all")), pipeline, args.rounds)
                    compare.append([name, label, f"{1000 * their_total:.0f}"] + [f"{1000 * e:.0f}" for e in ends]
                                   + [f"{e / their_total:.2f}" for e in ends] + [f"{ratio:.2f}"]
                                   + [f"{1000 * x[s]:.0f}" for s in ("decode", "preprocess", "forward",
                                                                       "heatmap 1", "overlay")])
    print(f"## Analyze latency per step, 224 px models, 14 findings ({machine()})\n")
    print("Median ms. `heatmap 1` / `heatmaps 14`: the architecture's default CAM method for one finding / "
          "for all 14 at once, at model size. `overlay`: one heatmap resized to the original resolution "
          "and blended with lung and heart contours (a download); `page overlay`: the same at the Analyze "
          f"page's display size (at most {DISPLAY_MAX_SIDE} px). `end to end` is the API path from file "
          "bytes (`medai.api.analyze_one`: decode, predict, heatmaps for 1 or all 14 findings, anatomy, "
          "attention shares, CTR, result JSON; no overlay PNG).\n")
    print(table(rows, ["architecture", "image"] + [f"{s} ms" for s in steps] + ["end to end 1 ms", "end to end 14 ms"]))
    print("\n### DenseNet121 and the shipped default chest model: medai vs torchxrayvision + pytorch-grad-cam "
          "(one finding)\n")
    print("theirs = `xrv.datasets.normalize` (or `xrv.utils.read_xray_dcm`), `XRayCenterCrop`, "
          "`XRayResizer(224)`, `xrv.models.DenseNet(weights=None)`, pytorch-grad-cam `GradCAM` on "
          "`features[-1]` for one finding, `show_cam_on_image` at 224 px (heatmap at model size, no anatomy). "
          "ours = end to end as above (heatmaps at model size, like theirs, plus the input gate, the learned "
          "anatomy and attention shares). `interleaved 14`: the median of ours (14 findings) / theirs (the whole "
          f"pipeline as one call) over {args.rounds} rounds timed back to back.\n")
    print(table(compare, ["ours", "image", "theirs total ms", "ours 1 finding ms", "ours 14 findings ms",
                          "ours/theirs 1", "ours/theirs 14", "interleaved 14",
                          "their decode", "their preprocess", "their forward", "their gradcam", "their overlay"]))


if __name__ == "__main__":
    main()
