"""Hybrid CNN-Transformer: a CNN builds a feature grid, a Transformer encoder relates its cells.

CNN part, one of two:
- ``backbone=None`` (from scratch): 3 conv-BN-ReLU blocks, 64-128-256 channels, /8 -> 2x2 patch projection (/16);
- ``backbone="efficientnet-lite0"`` (or -lite1/-lite2): the EfficientNet-Lite stem and MBConv stages up to
  stride 16 (ImageNet weights with ``model.pretrained: imagenet-efficientnet-lite0``; the first
  ``frozen_blocks`` kept fixed) -> 1x1 projection;
then tokens + learned positional embedding (interpolated for other image sizes) + CLS -> TransformerEncoder
(d=256, 8 heads, 4 layers, dropout 0.1) -> MLP head 256-128-n on the CLS token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medai.models.efficientnet import blocks_at_stride, build_lite, frozen_lite_modules, fuse_lite, run_blocks
from medai.models.registry import MedaiModel, register_model


def conv_block(cin: int, cout: int, stride: int = 1, pool: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                               nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class HybridCNNTransformer(MedaiModel):
    uses_token_grid = True

    def __init__(self, num_classes: int, image_size: int = 224, d_model: int = 256, num_heads: int = 8,
                 num_layers: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 stem_channels: tuple[int, int, int] = (64, 128, 256), head_hidden: int = 128,
                 backbone: str | None = None, frozen_blocks: int = 0):
        super().__init__()
        self.frozen_blocks = frozen_blocks
        if backbone is None:
            c1, c2, c3 = stem_channels
            self.stem = nn.Sequential(conv_block(1, c1, stride=2), conv_block(c1, c2),
                                      conv_block(c2, c3, pool=False))
            self.proj = nn.Conv2d(c3, d_model, kernel_size=2, stride=2)
            if frozen_blocks:
                raise ValueError("frozen_blocks needs a pretrained backbone")
        else:
            full = build_lite(backbone)
            self.stem = build_lite(backbone, blocks=blocks_at_stride(full, 16))
            frozen_lite_modules(self.stem, frozen_blocks)  # validates the count
            self.proj = nn.Conv2d(self.stem._blocks[-1]._bn2.num_features, d_model, kernel_size=1)
        self.base_grid = max(1, image_size // 16)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.base_grid * self.base_grid, d_model))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        layer = nn.TransformerEncoderLayer(d_model, num_heads, int(d_model * mlp_ratio), dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Sequential(nn.Linear(d_model, head_hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(head_hidden, num_classes))
        self._grid: tuple[int, int] = (self.base_grid, self.base_grid)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.base_grid, self.base_grid):
            return self.pos_embed
        grid = self.pos_embed.reshape(1, self.base_grid, self.base_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def frozen_modules(self) -> list[nn.Module]:
        return frozen_lite_modules(self.stem, self.frozen_blocks) if self.frozen_blocks else []

    def _cnn(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.stem, nn.Sequential):
            return self.stem(x)
        return run_blocks(self.stem, x, self.frozen_blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.proj(self._cnn(x))
        b, d, h, w = grid.shape
        self._grid = (h, w)
        tokens = grid.flatten(2).transpose(1, 2) + self._pos_embed_for(h, w)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return self.norm(self.encoder(tokens))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features[:, 0])

    def reset_classifier(self, num_classes: int) -> None:
        last = self.classifier[-1]
        self.classifier[-1] = nn.Linear(last.in_features, num_classes)

    def fuse_for_inference(self) -> None:
        if not isinstance(self.stem, nn.Sequential):  # the pretrained EfficientNet-Lite stages
            fuse_lite(self.stem)

    def cam_target_layers(self) -> list[nn.Module]:
        # The CNN stem's feature map (stride 8): gradients reach it through every transformer layer, and it
        # has twice the token grid's resolution. The last layer's input norm (the usual ViT choice) gave
        # empty maps for 57-67% of pneumonia images with gradient methods (benchmarks/RESULTS.md).
        # With a pretrained backbone: its last stage (stride 16, the token grid).
        return [self.stem] if isinstance(self.stem, nn.Sequential) else [self.stem._blocks[-1]]

    def cam_reshape_transform(self, activations: torch.Tensor) -> torch.Tensor:
        """Token sequences -> (B, C, H, W) grids; feature maps (the stem) pass through unchanged."""
        if activations.ndim == 4:
            return activations
        h, w = self._grid
        tokens = activations[:, 1:, :]
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


@register_model("hybrid_cnn_transformer", sized=True)
def hybrid_cnn_transformer(num_classes: int, **kwargs) -> HybridCNNTransformer:
    if "stem_channels" in kwargs:
        kwargs["stem_channels"] = tuple(kwargs["stem_channels"])
    return HybridCNNTransformer(num_classes, **kwargs)
