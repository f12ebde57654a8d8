"""``register_model`` / ``create_model`` / ``architectures`` and the surface every model shares.

Every model takes 1-channel input and offers ``forward``, ``forward_features``, ``forward_head``,
``reset_classifier``, ``head_parameters``, ``cam_target_layers`` and ``cam_reshape_transform``, so
training, Grad-CAM and metrics never branch on the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medai.errors import ConfigError

_REGISTRY: dict[str, Callable[..., "MedaiModel"]] = {}
_SIZED: set[str] = set()  # architectures whose layers depend on the input size (position embeddings)


class MedaiModel(nn.Module):
    """Base class: subclasses implement ``forward_features``, ``forward_head`` and the CAM hooks."""

    classifier: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in the first stage of two-stage fine-tuning."""
        return list(self.classifier.parameters())

    def frozen_modules(self) -> list[nn.Module]:
        """Pretrained layers kept fixed in training (weights and BatchNorm statistics); none by default."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters trained after the head stage: all but those of :meth:`frozen_modules`."""
        frozen = {id(p) for m in self.frozen_modules() for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def train(self, mode: bool = True) -> "MedaiModel":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def cam_target_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def cam_reshape_transform(self, activations: torch.Tensor) -> torch.Tensor:
        """Turn a target layer's activations into B x C x H x W (identity for CNNs)."""
        return activations

    uses_token_grid: bool = False  # True when cam_reshape_transform must be passed to pytorch-grad-cam
    # The class-specific CAM method explained by default: the best ROAD faithfulness measured for the
    # architecture (benchmarks/cam_quality.py, benchmarks/RESULTS.md); never the class-agnostic EigenCAM.
    cam_method: str = "gradcam"
    # Gaussian smoothing of each heatmap's grid before it is upsampled, sigma in grid cells; 0 = none
    cam_smooth: float = 0.0

    def fuse_for_inference(self) -> None:
        """Fold eval-mode BatchNorm into the convolutions, in place, where the architecture knows how: the
        same outputs with fewer operators (EfficientNet-Lite: 14 heatmaps at stride 16 in about 0.6x the
        time). Only for copies that never train again. The default does nothing."""

    def cam_linear_head_mask(self, activations: torch.Tensor) -> torch.Tensor | None:
        """For heads that average-pool the CAM target layer's output, gated elementwise by the returned
        mask, and apply one linear layer (``classifier``): the mask, so that each finding's gradient is
        known in closed form (no backward pass). None (the default): other heads are backpropagated."""
        return None


def register_model(name: str, sized: bool = False) -> Callable:
    """``sized``: the factory takes ``image_size`` (e.g. a transformer's position embeddings)."""
    def wrap(fn: Callable[..., MedaiModel]) -> Callable[..., MedaiModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        if sized:
            _SIZED.add(name)
        return fn
    return wrap


def model_kwargs(name: str, kwargs: dict[str, Any], image_size: int) -> dict[str, Any]:
    """``kwargs`` with the input size filled in for architectures that are built for one."""
    out = dict(kwargs)
    if name in _SIZED:
        out.setdefault("image_size", image_size)
    return out


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_chans: int = 1, pretrained: str | None = None,
                 **kwargs: Any) -> MedaiModel:
    """Build a registered architecture. ``pretrained`` is a path to a local state dict or the key of a
    packaged weight source (:data:`medai.models.pretrained.WEIGHT_SOURCES`)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(architectures())}")
    if in_chans != 1:
        raise ConfigError("MedAI models take 1-channel (grayscale) input; in_chans must be 1")
    try:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.kwargs for {name!r} are invalid: {exc}") from None
    if pretrained:
        from medai.models.pretrained import load_pretrained

        load_pretrained(model, pretrained)
    return model


def first_conv_to_grayscale(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel copy of a (3-channel) conv layer; weights are summed over input channels."""
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new
