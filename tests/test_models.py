"""The uniform model surface, learning on real images, checkpoints and local pretrained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medai.config import DataConfig
from medai.data.datasets import XrayDataset, load_records
from medai.data.transforms import PreprocessSpec
from medai.errors import CheckpointError, ConfigError, PretrainedWeightsError
from medai.models import create_model, architectures
from medai.models.checkpoint import load_checkpoint, new_card, read_card, save_checkpoint
from tests.conftest import need

SMALL = {  # fast variants of each family at 64 px
    "hybrid_cnn_transformer": {"image_size": 64},
    "vit_tiny": {"image_size": 64, "patch_size": 8},
    "densenet121": {},
    "resnet18": {},
    "efficientnet_lite0": {},
    "hybrid_lite": {"image_size": 64, "backbone": "efficientnet-lite0", "d_model": 64, "num_heads": 4,
                    "num_layers": 1},
}
ARCHITECTURE = {"hybrid_lite": "hybrid_cnn_transformer"}


def build(name: str, n: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(ARCHITECTURE.get(name, name), n, **SMALL[name])


def test_registry_lists_all_families():
    assert {"hybrid_cnn_transformer", "vit_tiny", "vit_small", "vit_base", "densenet121", "resnet18"} <= set(architectures())
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("alexnet", 2)
    with pytest.raises(ConfigError, match="1-channel"):
        create_model("densenet121", 2, in_chans=3)
    with pytest.raises(ConfigError, match="kwargs"):
        create_model("densenet121", 2, depth=5)


@pytest.mark.parametrize("name", SMALL)
def test_uniform_surface(name):
    model = build(name, 3).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)
        assert model(x).shape == (2, 3)
    layers = model.cam_target_layers()
    assert layers and all(any(layer is m for m in model.modules()) for layer in layers)
    captured = {}
    handle = layers[0].register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    grid = model.cam_reshape_transform(captured["a"])
    assert grid.ndim == 4 and grid.shape[0] == 2 and grid.shape[-1] > 1
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    head = {id(p) for p in model.head_parameters()}
    assert 0 < len(head) < len(list(model.parameters()))


def test_hybrid_defaults_follow_the_design_and_size_budget():
    model = create_model("hybrid_cnn_transformer", 14)
    layer = model.encoder.layers[0]
    assert layer.self_attn.embed_dim == 256 and layer.self_attn.num_heads == 8 and len(model.encoder.layers) == 4
    assert [m.out_channels for m in model.stem.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256]
    assert sum(p.numel() * 4 for p in model.parameters()) <= 45e6
    with torch.no_grad():  # another image size than configured: positional embedding is interpolated
        assert model.eval()(torch.randn(1, 1, 320, 256)).shape == (1, 14)


def real_batch(n: int = 16, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    recset = load_records(DataConfig(root=str(need("kermany-pneumonia"))))
    val = recset.split("val")
    normal = [r for r in val if r.target[0] == 1][: n // 2]
    pneu = [r for r in val if r.target[1] == 1][: n // 2]
    ds = XrayDataset(normal + pneu, PreprocessSpec(size))
    images, targets = zip(*[(ds[i][0], ds[i][1]) for i in range(len(ds))])
    return torch.stack(images), torch.stack(targets)


@pytest.mark.parametrize("name", SMALL)
def test_each_architecture_learns_on_real_images(name):
    images, targets = real_batch()
    model = build(name).train()
    vit = name.startswith("vit")  # no convolutional prior: a lower learning rate and more steps
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4 if vit else 1e-3)
    losses = []
    for _ in range(25 if vit else 12):
        loss = nn.functional.cross_entropy(model(images), targets.argmax(1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def card_for(name: str, labels=("NORMAL", "PNEUMONIA")) -> dict:
    return new_card(ARCHITECTURE.get(name, name), SMALL[name], "multiclass", list(labels), PreprocessSpec(64).to_dict())


@pytest.mark.parametrize("name", SMALL)
def test_checkpoint_round_trip_is_bit_identical(tmp_path: Path, name):
    model = build(name).eval()
    x, _ = real_batch(4)
    with torch.no_grad():
        expected = model(x)
    folder = tmp_path / "ckpt"
    path = save_checkpoint(model, card_for(name), folder / "m.safetensors")
    assert [p.name for p in folder.iterdir()] == ["m.safetensors"]  # no temporary file left
    loaded = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), expected)
    assert loaded.card["labels"] == ["NORMAL", "PNEUMONIA"] and len(loaded.sha256) == 64
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # not a pickle


def test_half_precision_storage_is_compact_and_close(tmp_path: Path):
    model = build("densenet121").eval()
    full = save_checkpoint(model, card_for("densenet121"), tmp_path / "f32.safetensors")
    half = save_checkpoint(model, card_for("densenet121"), tmp_path / "f16.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x, _ = real_batch(4)
    with torch.no_grad():
        a, b = model(x).softmax(1), load_checkpoint(half).model(x).softmax(1)
    assert torch.allclose(a, b, atol=5e-3)


def test_bad_checkpoints_are_specific_errors(tmp_path: Path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable"):
        read_card(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="no MedAI model card"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    good = save_checkpoint(build("resnet18"), card_for("resnet18"), tmp_path / "r.safetensors")
    card = read_card(good)
    card["architecture"] = "densenet121"
    card["model_kwargs"] = {}
    from medai.models.checkpoint import update_card

    update_card(good, architecture="densenet121", model_kwargs={})
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(good)


def test_pretrained_from_local_torchvision_file_sums_rgb_filters(tmp_path: Path):
    from torchvision.models import densenet121

    torch.manual_seed(1)
    reference = densenet121(weights=None)
    path = tmp_path / "densenet121_imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("densenet121", 3, pretrained=str(path))
    expected = reference.features.conv0.weight.sum(dim=1, keepdim=True)
    assert torch.equal(model.features.conv0.weight, expected)
    assert torch.equal(model.features.denseblock4.denselayer16.conv2.weight,
                       reference.features.denseblock4.denselayer16.conv2.weight)
    assert model.classifier.weight.shape == (3, 1024)  # head kept at our size, not ImageNet's


def test_hub_weights_fail_fast_with_advice():
    with pytest.raises(PretrainedWeightsError, match="never downloads"):
        create_model("densenet121", 2, pretrained="IMAGENET1K_V1")


def test_pretrained_for_the_wrong_architecture(tmp_path: Path):
    path = tmp_path / "r.pth"
    torch.save(create_model("resnet18", 2).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="does not match"):
        create_model("densenet121", 2, pretrained=str(path))


def test_pretrained_vit_from_a_timm_style_file(tmp_path: Path):
    """timm names are mapped to torchvision's; a 224-px position grid is resized to the model's."""
    from medai.models.pretrained import _TIMM_VIT_BLOCK

    torch.manual_seed(2)
    source = create_model("vit_tiny", 2, image_size=224, patch_size=16)
    inverse = {v: k for k, v in _TIMM_VIT_BLOCK.items()}
    timm_state = {}
    for key, value in source.vit.state_dict().items():
        new = key.replace("conv_proj.", "patch_embed.proj.")
        new = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed"}.get(new, new)
        if new.startswith("encoder.layers.encoder_layer_"):
            index, rest = new[len("encoder.layers.encoder_layer_"):].split(".", 1)
            for tv, timm in inverse.items():
                if rest.startswith(tv):
                    rest = timm + rest[len(tv):]
                    break
            new = f"blocks.{index}.{rest}"
        new = new.replace("encoder.ln.", "norm.").replace("heads.head.", "head.")
        if new == "patch_embed.proj.weight":
            value = value.repeat(1, 3, 1, 1) / 3  # an RGB file, as timm ships them
        timm_state[new] = value
    path = tmp_path / "vit_tiny_timm.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    same_size = create_model("vit_tiny", 2, image_size=224, patch_size=16, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.allclose(same_size.state_dict()[key], value, atol=1e-6), key
    smaller = create_model("vit_tiny", 2, image_size=64, patch_size=16, pretrained=str(path))
    assert smaller.vit.encoder.pos_embedding.shape == (1, 17, 192)
    assert torch.equal(smaller.vit.encoder.layers[5].mlp[0].weight, source.vit.encoder.layers[5].mlp[0].weight)
