"""Anatomy-guided training (``train.attention_loss``): the masks, their augmentation, the differentiable
Grad-CAM against pytorch-grad-cam's, and training that moves the heatmap onto the chest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, HiResCAM
from pytorch_grad_cam.utils.image import scale_cam_image

from medai.config import AugmentConfig, load_config
from medai.data.datasets import Record, XrayDataset, load_records
from medai.data.transforms import PreprocessSpec, augment_and_normalise, build_augmentation
from medai.errors import ConfigError
from medai.explain.cam import LogSoftmaxTarget
from medai.explain.segmentation import default_path
from medai.models import create_model
from medai.runs import read_progress
from medai.training import segmentation as seg_train
from medai.training.attention import ChestMasks, grad_cams, outside_share
from medai.training.trainer import train
from tests.conftest import need, tiny_config


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_mask_gets_the_same_crop_and_affine_as_its_image():
    """A bright rectangle and its mask: after random crops, rotations and shifts the mask still covers it."""
    image = np.full((96, 96), 30, np.uint8)
    image[20:70, 30:60] = 220
    mask = np.where(image > 128, 255, 0).astype(np.uint8)
    aug = build_augmentation(AugmentConfig(rotate_degrees=15, translate=0.1, scale=0.1, brightness=0.1,
                                           contrast=0.1, crop_min_area=0.5, erase_border=0.0))
    spec = PreprocessSpec(96, 0.5, 0.5)
    torch.manual_seed(0)
    moved = 0
    for _ in range(10):
        out, m = augment_and_normalise(image, spec, aug, mask)
        assert m.shape == out.shape == (1, 96, 96) and m.dtype == torch.float32
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}  # nearest neighbours: no blurred mask edges
        bright, inside = (out[0] > 0).numpy(), (m[0] > 0.5).numpy()
        assert iou(bright, inside) > 0.85
        moved += iou(inside, mask > 0) < 0.9
    assert moved >= 5  # the augmentation really moved the rectangle, so the test can tell
    plain, none = augment_and_normalise(image, spec, aug)  # no mask asked for: none returned
    assert none is None and plain.shape == (1, 96, 96)


@pytest.fixture(scope="module")
def chest_masks(tmp_path_factory) -> ChestMasks:
    weights = default_path()
    assert weights.is_file(), f"the shipped segmenter {weights} is missing"
    return ChestMasks(tmp_path_factory.mktemp("mask-cache"), 128, weights)


def test_chest_masks_are_the_lungs_and_heart_and_other_images_add_nothing(chest_masks):
    root = need("jsrt-scr-masks")
    for case in seg_train.cases(root, "test")[:4]:  # held out from the segmenter's training
        _film, manual = seg_train.load_case(root, case)
        union = torch.from_numpy(manual.max(axis=0).astype(np.float32))[None, None]
        truth = torch.nn.functional.interpolate(union, size=(128, 128), mode="area")[0, 0].numpy() > 0.5
        got = chest_masks(str(root / "images" / f"{case}.png"))
        assert got.shape == (128, 128) and got.dtype == np.uint8
        assert iou(got > 127, truth) > 0.85, case
    first = chest_masks.cache.misses
    chest_masks(str(root / "images" / f"{seg_train.cases(root, 'test')[0]}.png"))
    assert chest_masks.cache.misses == first  # read back from the cache, not segmented again
    mri = sorted(need("brain-tumor-mri").rglob("*.jpg"))[0]
    assert chest_masks(str(mri)) is None  # not a chest film: no mask, so no penalty
    # ...and after the augmentation the training sample's mask is still all inside (a rotated all-255 mask
    # has zero corners: the term would count the film and penalise its heatmap in the corners)
    from medai.config import AugmentConfig
    from medai.data.transforms import build_augmentation

    rotating = build_augmentation(AugmentConfig(enabled=True, rotate_degrees=30, translate=0.1, scale=0.1))
    dataset = XrayDataset([Record(mri.name, str(mri), np.zeros(2, np.float32), "p")], PreprocessSpec(128, 0.5, 0.5),
                          augment=rotating, masks=chest_masks)
    torch.manual_seed(1)
    assert all(bool((dataset[0][4] == 1).all()) for _ in range(3))


@pytest.mark.parametrize("method, reference_cam", [("gradcam", GradCAM), ("hirescam", HiResCAM)])
def test_the_penalised_map_is_the_cam_pytorch_grad_cam_computes(method, reference_cam):
    """The training-time map, upsampled the way pytorch-grad-cam does, equals its Grad-CAM (or HiResCAM,
    ``model.cam_method: hirescam``) of the same log-probability on a real film (so the loss acts on the
    heatmap the reader sees)."""
    film = sorted(need("kermany-pneumonia/val/PNEUMONIA").glob("*.jpeg"))[0]
    spec = PreprocessSpec(96, 0.5, 0.5)
    batch = XrayDataset([Record(film.name, str(film), np.zeros(2, np.float32), "p")], spec)[0][0][None]
    torch.manual_seed(0)
    model = create_model("hybrid_cnn_transformer", 2, image_size=96, d_model=64, num_heads=4, num_layers=2).eval()
    layer = model.cam_target_layers()[0]
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    logits = model(batch)
    handle.remove()
    ours = grad_cams(model, seen[-1], logits, torch.zeros(1, 2), "multiclass", method)
    assert len(ours) == 2  # one map per class of a softmax head
    reference = reference_cam(model=model, target_layers=[layer], reshape_transform=model.cam_reshape_transform)
    for c, cam in enumerate(ours):
        raw = cam.detach().numpy()
        expected = reference(batch, targets=[LogSoftmaxTarget(c)])[0]
        got = reference.aggregate_multi_layers([scale_cam_image(raw, (96, 96))[:, None]])[0]
        assert raw.max() > 0 and np.abs(got - expected).max() < 1e-4, c


def test_outside_share_counts_only_films_with_a_mask_and_is_differentiable():
    torch.manual_seed(0)
    model = create_model("resnet18", 3).eval()
    films = sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[:4]
    dataset = XrayDataset([Record(f.name, str(f), np.zeros(3, np.float32), "p") for f in films],
                          PreprocessSpec(128, 0.5, 0.5))
    images = torch.stack([dataset[i][0] for i in range(4)])
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]])
    masks = torch.zeros(4, 1, 128, 128)
    masks[:, :, :64] = 1.0
    masks[3] = 1.0  # no segmentation: all inside
    logits, share = outside_share(model, images, targets, masks, "multilabel")
    assert logits.shape == (4, 3) and 0 < share.item() < 1
    share.backward()
    assert model.classifier.weight.grad.abs().sum() > 0  # the loss reaches the head (second order)
    # by hand: a linear head on average pooling has d logit_c / dA = W_c / hw, so Grad-CAM = relu(W_pos . A)
    feats = model.forward_features(images).detach()
    w = model.classifier.weight.detach()
    expected = []
    for i in (0, 1):  # film 2 has no finding and film 3 no mask: they do not count, nor an empty map
        cam = torch.relu(torch.einsum("c,chw->hw", targets[i] @ w, feats[i]))
        inside = torch.nn.functional.adaptive_avg_pool2d(masks[i], cam.shape)[0]
        if cam.sum() > 0:
            expected.append(float((cam * (1 - inside)).sum() / cam.sum()))
    assert expected
    assert share.item() == pytest.approx(np.mean(expected), rel=1e-4)
    _, none = outside_share(model, images, targets, torch.ones(4, 1, 128, 128), "multilabel")
    assert none is None


def test_training_with_the_attention_loss_moves_the_heatmap_onto_the_chest(tmp_path):
    """Kermany films, a small hybrid: with the loss on, the share of Grad-CAM outside the learned chest
    falls over the run (it is logged per step and per epoch), and the run finishes with a model."""
    need("kermany-pneumonia")
    path = tiny_config(tmp_path, "kermany-pneumonia", data={"max_samples": 96},
                       preprocess={"image_size": 64},
                       train={"epochs": 3, "batch_size": 16, "attention_loss": 2.0, "lr": 2e-3, "bootstrap": 0,
                              "early_stopping_patience": None})
    run = train(load_config(path))
    records = read_progress(run)
    steps = [r["cam_outside"] for r in records if r.get("type") == "step" and "cam_outside" in r]
    epochs = [r["train_cam_outside"] for r in records if r.get("type") == "epoch"]
    assert len(epochs) == 3 and len(steps) >= 15
    assert np.mean(steps[-4:]) < np.mean(steps[:4]) - 0.05, steps
    assert (run / "best.safetensors").is_file()


def test_attention_loss_settings_are_checked(tmp_path):
    for bad, model, message in (({"attention_loss": -1}, {}, "must be >= 0"),
                                ({"attention_loss": 1, "nproc_per_node": 2}, {}, "not supported"),
                                ({"attention_loss": 1}, {"cam_method": "layercam"}, "with train.attention_loss"),
                                ({}, {"cam_method": "blurcam"}, "must be one of gradcam")):
        path = tiny_config(tmp_path, "kermany-pneumonia", train=bad, model=model)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_the_recipe_uses_the_attention_loss():
    cfg = load_config("configs/hybrid_lite0_pneumonia_attention.yaml")
    assert cfg.train.attention_loss > 0 and cfg.data.body_part == "chest"
    assert len(load_records(cfg.data).split("val")) > 500
