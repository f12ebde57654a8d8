"""The learned lung and heart segmentation: the shipped network on held-out JSRT masks, on other chest films,
its confidence, its CTR, the masks `medai explain` writes, and training that resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medai.data.io import decode_image
from medai.explain import segmentation as seg
from medai.explain.anatomy import ctr_summary, segment_chest
from medai.training import segmentation as train
from tests.conftest import need, run_cli

JSRT = "jsrt-scr-masks"


@pytest.fixture(scope="module")
def segmenter() -> seg.LearnedSegmenter:
    found = seg.segmenter()
    assert found is not None, f"the shipped segmenter {seg.default_path()} is missing"
    return found


def test_held_out_jsrt_masks_are_matched(segmenter):
    """Patient-disjoint test split (one film per patient): the card's Dice, recomputed."""
    scores = train.evaluate(segmenter.net, need(JSRT), "test")
    assert scores["cases"] >= 20
    assert scores["lungs"] >= 0.95 and scores["heart"] >= 0.88, scores
    card_test = segmenter.card["test"]
    assert scores["lungs"] == pytest.approx(card_test["lungs"], abs=2e-3)  # fp16 weights: tiny drift only
    assert not set(train.cases(need(JSRT), "test")) & set(train.cases(need(JSRT), "train"))


def test_chest_films_from_other_sources_get_plausible_confident_masks(segmenter):
    files = [need("dicom/siim_cxr_pa_mono2.dcm"), *sorted(need("nih-cxr14-sample/images").glob("*"))[:6]]
    for f in files:
        image = decode_image(f)
        anatomy = segment_chest(image.pixels, image.meta.body_part, image.meta.view, image.meta.modality)
        assert anatomy.applicable, (f.name, anatomy.reason)
        assert anatomy.ctr_detail["method"].startswith("learned")
        right, left = anatomy.right_lung, anatomy.left_lung
        assert 0.05 < right.mean() < 0.35 and 0.04 < left.mean() < 0.35, f.name
        assert np.nonzero(right.any(0))[0].mean() < np.nonzero(left.any(0))[0].mean()  # patient's right = image left
        assert 0.3 < anatomy.ctr < 0.7, (f.name, anatomy.ctr)
    summary = ctr_summary(anatomy, "PA")
    assert summary["method"].startswith("learned") and "reliable" in summary


def test_an_image_that_is_not_a_chest_film_gets_low_confidence_or_no_map(segmenter):
    rng = np.random.default_rng(0)
    noise = rng.random((256, 256)).astype(np.float32)
    s = segmenter.segment(noise)
    assert s.low_confidence
    anatomy = segment_chest(noise)
    assert not anatomy.applicable or anatomy.ctr_detail["confidence"] == "low"
    low = ctr_summary(anatomy, None)
    assert low["ctr"] is None or (not low["reliable"] and "not a reliable measurement" in low["caveat"])


def test_explain_writes_lung_and_heart_masks_at_image_size(tmp_path: Path):
    from medai.catalog import SHIPPED_MODELS_DIR

    film = need("dicom/siim_cxr_pa_mono2.dcm")
    run_cli("explain", "--checkpoint", str(SHIPPED_MODELS_DIR / "pneumonia-hybrid.safetensors"), str(film),
            "--out", str(tmp_path), check=True)
    report = json.loads((tmp_path / "siim_cxr_pa_mono2_explanation.json").read_text())
    assert set(report["masks"]) == {"lungs", "heart"}
    size = decode_image(film).pixels.shape
    for name in report["masks"].values():
        mask = np.asarray(Image.open(tmp_path / name))
        assert mask.shape == size and set(np.unique(mask)) == {0, 255}
    lungs = np.asarray(Image.open(tmp_path / report["masks"]["lungs"])) > 0
    assert 0.15 < lungs.mean() < 0.6


def test_augmentation_keeps_masks_on_the_anatomy():
    image, masks = train.load_case(need(JSRT), train.cases(need(JSRT), "train")[0])
    x, y = train.augment(torch.from_numpy(image)[None, None].repeat(6, 1, 1, 1),
                         torch.from_numpy(masks)[None].repeat(6, 1, 1, 1), torch.Generator().manual_seed(1))
    assert x.shape == (6, 1, 256, 256) and y.shape == (6, 3, 256, 256)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    lungs = y[:, :2].amax(dim=1)
    # under the moved lung masks the film is darker than elsewhere in the body: image and masks moved together
    for i in range(6):
        inside, outside = x[i, 0][lungs[i] > 0], x[i, 0][(lungs[i] == 0) & (x[i, 0] > 0.05)]
        assert inside.mean() < outside.mean() + 0.05, i


def test_training_checkpoints_each_epoch_and_resumes(tmp_path: Path):
    cfg = train.SegConfig(data=need(JSRT), out=tmp_path / "run", epochs=2, batch_size=8, max_cases=16)
    train.train(cfg, stop_after=1)  # as if killed after the first epoch
    lines = (cfg.out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]
    best = train.train(cfg, resume=True)
    assert [json.loads(line)["epoch"] for line in (cfg.out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert "resumed after epoch 0" in (cfg.out / "train.log").read_text()
    loaded = seg.LearnedSegmenter.load(cfg.out / "best.safetensors")
    assert loaded.card["best_epoch"] == best["epoch"] and loaded.card["kind"] == "segmentation"
