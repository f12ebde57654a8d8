"""Heatmaps for every architecture and CAM method, their sanity, concurrency and the anatomy map."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medai.config import DataConfig
from medai.data.datasets import XrayDataset, load_records
from medai.data.io import decode_image
from medai.data.transforms import PreprocessSpec, preprocess
from medai.explain.anatomy import attention_shares, ctr_summary, segment_chest, shortcut_warning
from medai.explain.masks import fill_holes
from medai.explain.cam import CAM_METHODS, CLASS_AGNOSTIC, ExplainError, LogSoftmaxTarget, compute_cams
from medai.explain.overlay import render_overlay
from medai.models import create_model
from tests.conftest import need, run_cli

SIZE = 64
ARCHS = {"hybrid_cnn_transformer": {"image_size": SIZE}, "vit_tiny": {"image_size": SIZE, "patch_size": 8},
         "densenet121": {}, "resnet18": {},  # EfficientNet-Lite from ImageNet, as it ships (random: empty maps)
         "efficientnet_lite0": {"frozen_blocks": 6, "pretrained": "imagenet-efficientnet-lite0"},
         "efficientnet_lite0 at stride 16": {"frozen_blocks": 6, "cam_stride": 16,
                                             "pretrained": "imagenet-efficientnet-lite0"}}
FINDINGS = ["Cardiomegaly", "Effusion", "Infiltration"]


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.nn.Module]:
    """Each architecture trained briefly on real NIH images (a few steps: non-degenerate gradients)."""
    root = need("nih-cxr14-train-224")
    recset = load_records(DataConfig(root=str(root), labels=FINDINGS))
    records = [r for r in recset.split("train") if r.target.any()][:24]
    ds = XrayDataset(records, PreprocessSpec(SIZE))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    targets = torch.stack([ds[i][1] for i in range(len(ds))])
    models = {}
    for name, kwargs in ARCHS.items():
        torch.manual_seed(0)
        model = create_model(name.split()[0], len(FINDINGS), **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        for _ in range(12):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        models[name] = model.eval()
    return models


@pytest.fixture(scope="module")
def chest() -> tuple[np.ndarray, torch.Tensor]:
    pixels = decode_image(sorted(need("kermany-pneumonia-fullres/NORMAL").glob("*.jpeg"))[0]).pixels
    return pixels, preprocess(pixels, PreprocessSpec(SIZE)).unsqueeze(0)


# Score-CAM on DenseNet121 (one forward pass per feature map of its 1024-channel target layer, ~45 s here)
# runs with `make test-all`; Score-CAM itself is checked on every other architecture by `make test`.
# EfficientNet-Lite's head is 2x2 at this size: every Score-CAM channel mask then covers most of the image
# and all three maps come out empty; its Score-CAM is checked at stride 16 (4x4).
SLOW_OR_SKIPPED = {("densenet121", "scorecam"): pytest.mark.slow,
                   ("efficientnet_lite0", "scorecam"): pytest.mark.skip("a 2x2 head map at 64 px")}
CAM_CASES = [pytest.param(a, m, marks=SLOW_OR_SKIPPED[(a, m)]) if (a, m) in SLOW_OR_SKIPPED else (a, m)
             for a in ARCHS for m in CAM_METHODS]


@pytest.mark.parametrize("arch,method", CAM_CASES)
def test_heatmaps_for_every_architecture_and_method(trained, chest, arch, method):
    pixels, batch = chest
    assert pixels.shape[0] != pixels.shape[1]  # a non-square original
    result = compute_cams(trained[arch], batch, [0, 1, 2], method, output_size=pixels.shape)
    for h in result.heatmaps.values():
        assert h.shape == pixels.shape and h.dtype == np.float32
        assert not np.isnan(h).any() and h.min() >= 0 and h.max() <= 1
    # a finding with no positive evidence anywhere has an all-zero GradCAM-style map; not all of them
    c = max(result.heatmaps, key=lambda k: result.heatmaps[k].max())
    a, b = result.heatmaps[c], result.heatmaps[(c + 1) % 3]
    assert a.max() > 0.5
    if method in CLASS_AGNOSTIC:
        assert np.array_equal(a, b)
    else:
        assert not np.allclose(a, b, atol=1e-3), "two findings gave the same heatmap"
    perturbed = copy.deepcopy(trained[arch])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * (p.std() if p.numel() > 1 else 0.1) * 0.5)
    other = compute_cams(perturbed, batch, [c], method, output_size=pixels.shape).heatmaps[c]
    assert not np.allclose(other, a, atol=1e-3), "heatmap insensitive to the model's weights"


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_shared_forward_matches_the_library_one_finding_at_a_time(trained, chest, arch, softmax):
    """Closed-form linear-head gradients (no backward) and one batched backward for all findings give
    exactly pytorch-grad-cam's own GradCAM, for raw logits (sigmoid heads) and for log-probabilities
    (softmax heads)."""
    _, batch = chest
    model = trained[arch]
    ours = compute_cams(model, batch, [0, 1, 2], "gradcam", softmax=softmax)
    closed_form = ("densenet121", "resnet18", "efficientnet_lite0")  # pooled target layer + linear head
    assert ours.backward_passes == (0 if arch in closed_form else 1)  # else one batched backward
    reshape = model.cam_reshape_transform if model.uses_token_grid else None
    for c in range(3):
        reference_model = copy.deepcopy(model)
        cam = GradCAM(model=reference_model, target_layers=reference_model.cam_target_layers(),
                      reshape_transform=reference_model.cam_reshape_transform if reshape else None)
        expected = cam(batch, [LogSoftmaxTarget(c) if softmax else ClassifierOutputTarget(c)])[0]
        cam.activations_and_grads.release()
        # the library divides by (max + 1e-7); compute_cams divides by the max itself, so the two maps
        # are equal up to that scale factor
        if expected.max() > 0:
            expected = expected / expected.max()
        np.testing.assert_allclose(ours.heatmaps[c], expected, atol=1e-5)


def test_one_backward_per_finding_where_the_batched_backward_fails(trained, chest, monkeypatch):
    """Where torch.func.vmap cannot batch the backward pass, each finding gets its own, with the same maps."""
    _, batch = chest
    model = trained["hybrid_cnn_transformer"]
    batched = compute_cams(model, batch, [0, 1, 2], "gradcam", softmax=True)

    def no_batching(_fn):
        raise RuntimeError("no batching rule")
    monkeypatch.setattr(torch.func, "vmap", no_batching)
    looped = compute_cams(model, batch, [0, 1, 2], "gradcam", softmax=True)
    assert (batched.backward_passes, looped.backward_passes) == (1, 3)
    for c in range(3):
        np.testing.assert_allclose(looped.heatmaps[c], batched.heatmaps[c], atol=1e-6)


def test_concurrent_explanations_do_not_interfere(trained):
    model = trained["hybrid_cnn_transformer"]
    files = sorted(need("nih-cxr14-sample/images").glob("*.jpg"))[:4]
    batches = [preprocess(decode_image(f).pixels, PreprocessSpec(SIZE)).unsqueeze(0) for f in files]
    alone = [compute_cams(model, b, [0, 1], "gradcam").heatmaps for b in batches]
    results: dict[int, dict] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = compute_cams(model, batches[i], [0, 1], "gradcam").heatmaps
            with torch.inference_mode():  # plain inference on the shared model meanwhile
                model(batches[(i + 1) % 4])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for c in (0, 1):
            np.testing.assert_array_equal(results[i][c], alone[i][c])
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_bad_requests_are_explained_errors(trained, chest):
    _, batch = chest
    with pytest.raises(ExplainError, match="unknown CAM method"):
        compute_cams(trained["resnet18"], batch, [0], "gradcam-9000")
    with pytest.raises(ExplainError, match="one image"):
        compute_cams(trained["resnet18"], batch.repeat(2, 1, 1, 1), [0], "gradcam")


def test_anatomy_on_a_real_chest_xray():
    png = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0]
    image = decode_image(png)
    anatomy = segment_chest(image.pixels)
    assert anatomy.applicable, anatomy.reason
    regions = anatomy.regions()
    total = sum(m.astype(int) for m in regions.values())
    assert (total == 1).all()  # disjoint and covering
    for lung in ("right_lung", "left_lung"):
        assert 0.03 < regions[lung].mean() < 0.35
    assert np.argwhere(anatomy.right_lung)[:, 1].mean() < np.argwhere(anatomy.left_lung)[:, 1].mean()
    assert 0.3 < anatomy.ctr < 0.7
    uniform = attention_shares(np.ones_like(image.pixels), anatomy)
    assert sum(uniform.values()) == pytest.approx(1.0)
    assert uniform["right_lung"] == pytest.approx(regions["right_lung"].mean(), abs=0.01)
    corner = np.zeros_like(image.pixels)
    corner[:50, :50] = 1.0  # all attention in the image corner: a shortcut
    shares = attention_shares(corner, anatomy)
    assert shares["outside_body"] + shares["rest_of_body"] > 0.95
    assert "shortcut" in shortcut_warning(shares)
    empty = attention_shares(np.zeros_like(image.pixels), anatomy)
    assert sum(empty.values()) == 0 and shortcut_warning(empty) is None  # no attention: no shortcut claim
    assert "AP view" in ctr_summary(anatomy, "AP")["note"]


def test_anatomy_morphology_equals_scipy_on_real_masks():
    """The separable filters and the one-labelling hole fill are exact replacements for scipy's binary
    morphology (3x3 opening, 7x7 closing twice, hole filling) and for the per-row edge-run scan."""
    from scipy import ndimage as ndi

    from medai.explain import anatomy as an

    files = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[:3] + [need("dicom/siim_cxr_pa_mono2.dcm")]
    for f in files:
        x = an._prepare(decode_image(f).pixels)
        for factor in an.THRESHOLD_FACTORS:
            dark = x < an._central_threshold(x) * factor
            np.testing.assert_array_equal(an._opening(dark, 3), ndi.binary_opening(dark, np.ones((3, 3))))
            np.testing.assert_array_equal(an._closing(dark, 13), ndi.binary_closing(dark, np.ones((7, 7)), 2))
            np.testing.assert_array_equal(fill_holes(dark), ndi.binary_fill_holes(dark))
            np.testing.assert_array_equal(fill_holes(~dark), ndi.binary_fill_holes(~dark))
            margin = int(dark.shape[1] * an.EDGE_MARGIN)
            expected = np.zeros_like(dark)
            for y, row in enumerate(dark):  # the definition, one row at a time
                if row[:margin].any():
                    start = int(np.argmax(row[:margin]))
                    end = start
                    while end < len(row) and row[end]:
                        end += 1
                    expected[y, :end] = True
            np.testing.assert_array_equal(an._runs_from_left(dark, margin), expected)


def test_anatomy_refuses_non_chest_inputs():
    tibia = decode_image(need("dicom/pydicom_data_RG3_J2KR.dcm"))
    anatomy = segment_chest(tibia.pixels, tibia.meta.body_part, tibia.meta.view)
    assert not anatomy.applicable and "EXTREMITY" in anatomy.reason and anatomy.right_lung is None
    an_mr = segment_chest(decode_image(need("dicom/siim_cxr_pa_mono2.dcm")).pixels, modality="MR")
    assert not an_mr.applicable and "MR" in an_mr.reason
    mri = sorted(need("brain-tumor-mri").rglob("*.jpg"))[::25]
    results = [segment_chest(decode_image(f).pixels) for f in mri]
    assert sum(not a.applicable for a in results) >= 0.9 * len(mri)  # ~2% still pass (benchmarks/anatomy.py)
    assert sum("dark background" in a.reason for a in results) >= 0.8 * len(mri)  # the slice is framed in black


def test_overlay_keeps_the_image_and_draws_contours():
    image = decode_image(sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0])
    anatomy = segment_chest(image.pixels)
    heat = np.zeros_like(image.pixels)
    rgb = render_overlay(image.pixels, heat, 0.5)
    assert rgb.shape == image.pixels.shape + (3,)
    np.testing.assert_array_equal(rgb[..., 0], (image.pixels * 255 + 0.5).astype(np.uint8))  # zero heat
    with_contours = render_overlay(image.pixels, heat, 0.5, anatomy)
    assert (with_contours != rgb).any(axis=-1).mean() > 0.001


def test_explain_cli_writes_overlays_and_json(tmp_path: Path, trained):
    from medai.models.checkpoint import new_card, save_checkpoint

    ckpt = save_checkpoint(trained["densenet121"], new_card("densenet121", {}, "multilabel", FINDINGS,
                                                            PreprocessSpec(SIZE).to_dict()),
                           tmp_path / "nih.safetensors")
    png = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0]
    out = tmp_path / "out"
    proc = run_cli("explain", "--checkpoint", str(ckpt), str(png), "--findings", "all", "--out", str(out),
                   check=True)
    report = json.loads((out / f"{png.stem}_explanation.json").read_text())
    assert report["explained"] == FINDINGS and report["method"] == "hirescam"  # densenet121's default
    assert set(report["attention_shares"]["Effusion"]) == {"right_lung", "left_lung", "heart",
                                                            "rest_of_body", "outside_body"}
    assert report["cardiothoracic_ratio"]["ctr"] is not None
    assert len(list(out.glob("*_mask.png"))) == 2 and len(list(out.glob("*.png"))) == 5 and "CTR" in proc.stdout
    bad = run_cli("explain", "--checkpoint", str(ckpt), str(png), "--findings", "Fracture", "--out", str(out))
    assert bad.returncode == 2 and "unknown findings" in bad.stderr


def test_ctr_separates_cardiomegaly_from_normal_pa_films():
    """On real NIH PA films the CTR ranks Cardiomegaly above No Finding (table: benchmarks/anatomy.py)."""
    import csv

    from sklearn.metrics import roc_auc_score

    root = need("nih-cxr14-sample")
    rows = [r for r in csv.DictReader(open(root / "Data_Entry_2017_v2020.csv")) if r["View Position"] == "PA"]
    cardio = [r for r in rows if "Cardiomegaly" in r["Finding Labels"].split("|")]
    normal = [r for r in rows if r["Finding Labels"] == "No Finding"]
    ctr, y = [], []
    for r in cardio + normal:
        anatomy = segment_chest(decode_image(root / "images" / r["Image Index"]).pixels, view="PA")
        if anatomy.applicable and anatomy.ctr is not None:
            ctr.append(anatomy.ctr)
            y.append(r in cardio)
    assert len(y) >= 0.95 * len(cardio + normal)
    assert roc_auc_score(y, ctr) >= 0.80  # the target, on all Cardiomegaly / No Finding PA films


def test_cam_copies_are_per_thread_and_follow_weight_changes():
    from medai.explain.cam import private_copy

    model = create_model("resnet18", 2).eval()
    first = private_copy(model)
    assert private_copy(model) is first and first is not model  # reused within a thread
    assert not model._forward_hooks and all(not p.requires_grad or p.grad is None for p in model.parameters())
    other = {}
    worker = threading.Thread(target=lambda: other.setdefault("copy", private_copy(model)))
    worker.start()
    worker.join()
    assert other["copy"] is not first  # another thread never shares this thread's hooks
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # weights changed in place (a reload, a training step)
    fresh = private_copy(model)
    assert fresh is not first and torch.equal(fresh.classifier.weight, model.classifier.weight)
