"""Every checkpoint shipped in models/: complete card, rendered Markdown, small, and it works on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medai.catalog import DEFAULT_MODEL
from medai.inference import Predictor
from medai.models.checkpoint import read_card
from medai.shipping import render_card, training_schedule
from tests.conftest import ROOT, need

SHIPPED = sorted((ROOT / "models").glob("*.safetensors"))
# a few real images per model: (data folder, glob) -> used only to check the model runs on its own kind of data
SAMPLES = {"pneumonia": "kermany-pneumonia/val", "brain-mri": "brain-tumor-mri", "nih14": "nih-cxr14-sample/images"}


def test_models_are_shipped_and_small():
    names = {p.stem for p in SHIPPED}
    assert "pneumonia-hybrid" in names, "the pneumonia hybrid must ship"
    assert sum(p.stat().st_size for p in SHIPPED) < 100 * 2**20


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_card_is_complete_and_rendered(path: Path):
    card = read_card(path)
    mc = card["model_card"]
    assert card["labels"] and card["thresholds"].keys() == set(card["labels"])
    val = card["metrics"]["val"]
    assert val["macro"]["auroc"] is not None and all(c["auroc_ci95"] for c in val["per_class"].values()
                                                      if c["auroc"] is not None)
    assert {"ece_before", "ece_after", "temperature"} <= set(val["calibration"])
    disjoint = mc["data"]["summary"]["patient_disjoint"]
    assert mc["data"]["licence"] and isinstance(disjoint, bool)
    assert disjoint or "patient" in mc["notes"], "an overlapping split must be explained in the card"
    assert mc["training"]["time_s"] > 0 and mc["training"]["hardware"]
    assert "not for diagnosis" in mc["intended_use"] and mc["limitations"]
    md = path.with_suffix(".md").read_text()
    assert f"# Model card: {path.stem}" in md and "## Known limitations" in md
    # the Markdown is the card as stored, not an older rendering, and gives the weights' size on disk
    assert md == render_card({**card, "model_card": {**mc, "file_mb": round(path.stat().st_size / 2**20, 1)}})
    assert f"({path.stat().st_size / 2**20:.1f} MB)" in md


HYBRIDS = [p for p in SHIPPED if read_card(p)["architecture"] == "hybrid_cnn_transformer"]


@pytest.mark.parametrize("path", HYBRIDS, ids=[p.stem for p in HYBRIDS])
def test_a_shipped_hybrid_reports_a_resnet18_of_the_same_data_and_schedule(path: Path):
    """The hybrid's claim is against a plain ResNet-18 trained the same way: its card carries that baseline,
    and the shipped hybrid is at least as good on validation (macro AUROC; pneumonia-hybrid 0.9924 against
    0.9915, -chest 0.9932 against 0.9915, brain-mri-hybrid 0.992 against 0.979)."""
    card = read_card(path)
    base = card["model_card"].get("baseline")
    assert base and base["architecture"] == "resnet18", f"{path.stem}: no ResNet-18 baseline in its card"
    assert base["schedule"] == training_schedule(card), f"{path.stem}: the baseline was trained differently"
    assert "same data and schedule" in path.with_suffix(".md").read_text()
    assert card["metrics"]["val"]["macro"]["auroc"] >= base["macro"]["auroc"], f"{path.stem} loses to its baseline"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_loads_from_its_card_alone_and_predicts_real_images(path: Path):
    folder = need(next(v for k, v in SAMPLES.items() if path.stem.startswith(k)))
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[::50][:6]
    predictor = Predictor(path)
    predictions = predictor.predict_many(images)
    for pred in predictions:
        assert len(pred.probabilities) == len(predictor.labels)
        assert all(0.0 <= p <= 1.0 for p in pred.probabilities)
    if predictor.kind == "multiclass":
        assert all(abs(sum(p.probabilities) - 1) < 1e-4 for p in predictions)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.startswith("pneumonia")],
                         ids=lambda p: p.stem)
def test_pneumonia_models_separate_real_val_images(path: Path):
    val = need("kermany-pneumonia/val")
    normal = sorted((val / "NORMAL").glob("*.jpeg"))[::19][:8]
    pneumonia = sorted((val / "PNEUMONIA").glob("*.jpeg"))[::53][:8]
    predictor = Predictor(path)
    column = predictor.labels.index("PNEUMONIA")
    probs = [p.probabilities[column] for p in predictor.predict_many(normal + pneumonia)]
    assert roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(pneumonia))], probs) >= 0.9


def test_cards_name_the_body_part_and_a_brain_model_never_gets_chest_anatomy():
    from medai.data.io import decode_image
    from medai.explain.anatomy import segment_chest
    from medai.analysis import explain_image

    parts = {p.stem: read_card(p)["task"].get("body_part") for p in SHIPPED}
    assert all(part == ("brain" if stem.startswith("brain") else "chest") for stem, part in parts.items()), parts
    # an MRI slice that the chest checks alone would accept (the ~2% whose head reaches the border)
    slices = sorted(need("brain-tumor-mri").rglob("*.jpg"))
    image = next(im for im in map(decode_image, slices) if segment_chest(im.pixels).applicable)
    result = explain_image(Predictor(ROOT / "models" / "brain-mri-hybrid.safetensors"), image)
    assert not result.anatomy.applicable and "brain" in result.anatomy.reason and not result.shares


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem.startswith("nih14")], ids=lambda p: p.stem)
def test_nih14_model_finds_the_14_findings_on_external_images(path: Path):
    """A fixed 200-image subset of nih-cxr14-sample (patients never seen in training): the mean AUROC over
    the findings beats the from-scratch ResNet-18's 0.654 (on all 621); the default chest model reaches
    issue 21's bar of 0.70 (0.713 here, 0.715 on all 621); any other NIH model shipped beside it must beat
    0.66."""
    from medai.config import DataConfig
    from medai.data.datasets import load_records

    records = load_records(DataConfig(root=str(need("nih-cxr14-sample")))).records[:200]
    predictor = Predictor(path)
    probs = np.array([p.probabilities for p in predictor.predict_many([r.source for r in records])])
    targets = np.stack([r.target for r in records])
    aurocs = [roc_auc_score(targets[:, i], probs[:, i]) for i in range(targets.shape[1])
              if 0 < targets[:, i].sum() < len(records)]
    assert len(predictor.labels) == 14 and len(aurocs) >= 12
    assert np.mean(aurocs) >= (0.70 if path.stem == DEFAULT_MODEL else 0.66), np.round(aurocs, 3)


def test_the_anatomy_guided_pneumonia_models_look_at_the_chest():
    """Both hybrids trained with the anatomy term (train.attention_loss) put most of their PNEUMONIA heatmap on
    the learned lungs and heart of real Kermany val films, where a flat map puts 35%: pneumonia-hybrid-chest
    0.954 and pneumonia-hybrid (its stage 2, Kermany plus NIH adults) 0.951 over all 595 (benchmarks/
    heatmap_on_chest.py); the from-scratch hybrid shipped under that name until 2026-12-07, 0.358 (0.30 on these
    six films), and after its own stage 2 0.630."""
    from medai.analysis import analyze_and_explain

    val = need("kermany-pneumonia/val")
    films = sorted((val / "PNEUMONIA").glob("*.jpeg"))[::60][:4] + sorted((val / "NORMAL").glob("*.jpeg"))[::40][:2]
    share = {}
    for name in ("pneumonia-hybrid-chest", "pneumonia-hybrid"):
        predictor = Predictor(ROOT / "models" / f"{name}.safetensors")
        inside = []
        for film in films:
            _analysis, exp = analyze_and_explain(predictor, "test", film.read_bytes(), film.name, ["PNEUMONIA"], None)
            inside.append(sum(exp.shares["PNEUMONIA"][region] for region in ("right_lung", "left_lung", "heart")))
        share[name] = float(np.mean(inside))
    assert share["pneumonia-hybrid-chest"] >= 0.8 and share["pneumonia-hybrid"] >= 0.8, share  # 0.95 and 0.94


def test_the_default_chest_model_explains_at_stride_16_with_hirescam():
    """What Analyze, the API and the PACS node draw for the default model: HiResCAM at the last stride-16
    block, the map that points best on the radiologists' boxes (benchmarks/RESULTS.md)."""
    from medai.analysis import default_method

    shipped = Predictor(ROOT / "models" / "nih14-efficientnet-lite0.safetensors")
    assert shipped.model.cam_stride == 16 and default_method(shipped) == "hirescam"


def _pointing_game(model, method: str, films: list[tuple[Path, list[tuple[str, float, float, float, float]]]],
                   labels: list[str], spec) -> float:
    from medai.data.io import decode_image
    from medai.data.transforms import preprocess
    from medai.explain.cam import compute_cams

    hits = []
    for path, boxes in films:
        image = decode_image(path)
        batch = preprocess(image.pixels, spec).unsqueeze(0)
        classes = sorted({labels.index(lab) for lab, *_ in boxes})
        heat = compute_cams(model, batch, classes, method, image.pixels.shape).heatmaps
        for lab, x, y, w, h in boxes:
            py, px = np.unravel_index(int(np.argmax(heat[labels.index(lab)])), image.pixels.shape)
            hits.append(x <= px <= x + w and y <= py <= y + h)
    return float(np.mean(hits))


def test_the_default_chest_model_points_at_the_radiologists_boxes_from_stride_16():
    """The same weights explained at the last stride-16 block (the shipped card's ``cam_stride: 16``, with
    HiResCAM) put the heatmap's peak inside more of the radiologists' boxes than at the head's 7x7 map with
    its best method there, Grad-CAM++ (benchmarks/cam_quality.py, all 515 boxes: 0.373 vs 0.270). Checked
    here on every fourth boxed film."""
    import csv

    from medai.models import create_model

    root = need("nih-cxr14-bbox")
    boxes: dict[str, list] = {}
    for r in csv.DictReader(open(root / "bboxes_512px.csv")):
        label = {"Infiltrate": "Infiltration"}.get(r["Finding Label"], r["Finding Label"])
        boxes.setdefault(r["Image Index"], []).append((label, *(float(r[k]) for k in ("x", "y", "w", "h"))))
    folder = root / "images" if (root / "images").is_dir() else root
    films = [(folder / name, items) for name, items in sorted(boxes.items())[::4] if (folder / name).exists()]
    shipped = Predictor(ROOT / "models" / "nih14-efficientnet-lite0.safetensors")
    card = shipped.ckpt.card
    head = create_model(card["architecture"], 14, **{**card["model_kwargs"], "cam_stride": 32}).eval()
    head.load_state_dict(shipped.model.state_dict())
    at_16 = _pointing_game(shipped.model, shipped.model.cam_method, films, shipped.labels, shipped.spec)
    at_32 = _pointing_game(head, head.cam_method, films, shipped.labels, shipped.spec)
    assert len(films) > 100 and at_16 > at_32 + 0.03, (at_16, at_32)
