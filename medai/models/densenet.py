"""DenseNet121 with a CheXNet-style head (global average pooling + one linear layer per finding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet121 as tv_densenet121

from medai.models.registry import MedaiModel, first_conv_to_grayscale, register_model


class DenseNet121(MedaiModel):
    cam_method = "hirescam"

    def __init__(self, num_classes: int, drop_rate: float = 0.0, memory_efficient: bool = False):
        super().__init__()
        net = tv_densenet121(weights=None, drop_rate=drop_rate, memory_efficient=memory_efficient)
        net.features.conv0 = first_conv_to_grayscale(net.features.conv0)
        self.features = net.features
        self.classifier = nn.Linear(net.classifier.in_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.classifier.in_features, num_classes)

    def cam_target_layers(self) -> list[nn.Module]:
        return [self.features.norm5]

    def cam_linear_head_mask(self, activations: torch.Tensor) -> torch.Tensor:
        return (activations > 0).float()  # forward_features applies ReLU after norm5


@register_model("densenet121")
def densenet121(num_classes: int, **kwargs) -> DenseNet121:
    return DenseNet121(num_classes, **kwargs)
