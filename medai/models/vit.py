"""Vision Transformers on torchvision's VisionTransformer, 1-channel input, any patch/image size."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from medai.models.registry import MedaiModel, register_model

VIT_SIZES = {  # layers, heads, hidden, mlp
    "tiny": (12, 3, 192, 768),
    "small": (12, 6, 384, 1536),
    "base": (12, 12, 768, 3072),
}


class MedaiViT(MedaiModel):
    uses_token_grid = True
    cam_method = "layercam"

    def __init__(self, num_classes: int, size: str = "tiny", image_size: int = 224, patch_size: int = 16,
                 dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        layers, heads, hidden, mlp = VIT_SIZES[size]
        self.vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=layers,
                                     num_heads=heads, hidden_dim=hidden, mlp_dim=mlp, dropout=dropout,
                                     attention_dropout=attention_dropout, num_classes=num_classes)
        self.vit.conv_proj = nn.Conv2d(1, hidden, kernel_size=patch_size, stride=patch_size)
        self.classifier = self.vit.heads
        self.patch_size = patch_size
        self._grid = (image_size // patch_size, image_size // patch_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.vit._process_input(x)
        cls = self.vit.class_token.expand(tokens.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, tokens], dim=1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.vit.heads(features[:, 0])

    def reset_classifier(self, num_classes: int) -> None:
        self.vit.heads = nn.Sequential(nn.Linear(self.vit.hidden_dim, num_classes))
        self.classifier = self.vit.heads

    def cam_target_layers(self) -> list[nn.Module]:
        return [self.vit.encoder.layers[-1].ln_1]

    def cam_reshape_transform(self, activations: torch.Tensor) -> torch.Tensor:
        h, w = self._grid
        tokens = activations[:, 1:, :]
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


for _size in VIT_SIZES:
    register_model(f"vit_{_size}", sized=True)(lambda num_classes, _s=_size, **kw: MedaiViT(num_classes, size=_s, **kw))
