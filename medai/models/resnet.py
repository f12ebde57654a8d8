"""ResNet-18: a plain torchvision baseline so that the other models' numbers have a reference."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from medai.models.registry import MedaiModel, first_conv_to_grayscale, register_model


class ResNet18(MedaiModel):
    def __init__(self, num_classes: int):
        super().__init__()
        net = tv_resnet18(weights=None)
        net.conv1 = first_conv_to_grayscale(net.conv1)
        net.fc = nn.Identity()
        self.body = net
        self.classifier = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.body.avgpool(features), 1))

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(512, num_classes)

    def cam_target_layers(self) -> list[nn.Module]:
        return [self.body.layer4[-1]]

    def cam_linear_head_mask(self, activations: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(activations)  # the last block's output is pooled as it is


@register_model("resnet18")
def resnet18(num_classes: int, **kwargs) -> ResNet18:
    return ResNet18(num_classes, **kwargs)
