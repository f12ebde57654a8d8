"""Learned lung and heart segmentation of frontal chest films (trained on the JSRT/SCR manual masks).

``LungHeartNet`` is a small U-Net: the ImageNet EfficientNet-Lite0 stages up to stride 16 as encoder (the
pretrained backbone of the classifiers), a light decoder with skip connections, and three sigmoid
outputs (the patient's right lung, left lung, heart; the heart may overlap the lungs at the edges, as in
the SCR masks). Input: one 256 x 256 grey channel, contrast stretched between the 1st and 99th
percentile like the JSRT films it learned from, then the Lite normalisation ``(x - 0.5) / 0.5``.

``LearnedSegmenter`` turns its output into a ``ChestAnatomy`` (the same masks, regions and CTR as the
classical method of ``anatomy.py``) with a per-image confidence: the mean soft Dice between each
probability map and its own thresholded mask (1.0 when every pixel is decided, lower when the network
hesitates), and shape checks (two lungs, one heart between them). Low confidence keeps the masks but
flags the CTR as unreliable.

The shipped weights live in ``models/anatomy/`` (a ``.safetensors`` file whose metadata holds the card,
as the classifiers' checkpoints do); training is ``medai anatomy train`` (``medai/training/segmentation.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from medai.explain.masks import fill_holes, largest_component
from medai.imaging import resize_float
from medai.errors import CheckpointError
from medai.models.efficientnet import blocks_at_stride, build_lite, fuse_lite

log = logging.getLogger(__name__)

SIZE = 256
STRUCTURES = ("right_lung", "left_lung", "heart")
DEFAULT_FILE = "lung-heart-lite0.safetensors"
# Below this confidence the masks are shown but no CTR headline is given. Set by hand, not fitted:
# benchmarks/anatomy.py reports the share of NIH PA films that stay above it ("reliable CTR").
MIN_CONFIDENCE = 0.85


def stretch_batch(image: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1], each image stretched between its 1st and 99th percentile: the contrast of
    the JSRT films the network learned from. Training applies it to every augmented batch."""
    flat = image.flatten(1)
    lo, hi = torch.quantile(flat, 0.01, dim=1), torch.quantile(flat, 0.99, dim=1)
    return ((image - lo.view(-1, 1, 1, 1)) / (hi - lo).clamp_min(1e-6).view(-1, 1, 1, 1)).clamp(0, 1)


def stretch(pixels: np.ndarray) -> torch.Tensor:
    """A decoded [0, 1] image as the network's (1, 1, SIZE, SIZE) input."""
    x = resize_float(pixels, (SIZE, SIZE)).astype(np.float32, copy=False)
    return stretch_batch(torch.from_numpy(np.ascontiguousarray(x))[None, None])


class _Up(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin + skip, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class LungHeartNet(nn.Module):
    def __init__(self, variant: str = "efficientnet-lite0", width: int = 32, frozen_blocks: int = 0):
        super().__init__()
        self.frozen_blocks = frozen_blocks  # stem and the first blocks kept at their ImageNet weights
        probe = build_lite(variant)
        self.encoder = build_lite(variant, blocks=blocks_at_stride(probe, 16))
        self.variant = variant
        self.taps, chans = [], []  # the last block at each stride: the skip connections
        for index, block in enumerate(self.encoder._blocks):
            step = block._block_args.stride
            if (step[0] if isinstance(step, (list, tuple)) else step) > 1 and index:
                self.taps.append(index - 1)
                chans.append(self.encoder._blocks[index - 1]._block_args.output_filters)
        self.taps.append(len(self.encoder._blocks) - 1)
        chans.append(self.encoder._blocks[-1]._block_args.output_filters)
        deep, skips = chans[-1], chans[:-1][::-1]  # 112 at /16; skips 40 (/8), 24 (/4), 16 (/2)
        widths = [width * 2, width, width // 2]  # decoded to stride 2; the logits are upsampled
        self.ups = nn.ModuleList()
        cin = deep
        for skip, cout in zip(skips, widths):
            self.ups.append(_Up(cin, skip, cout))
            cin = cout
        self.out = nn.Conv2d(cin, len(STRUCTURES), 1)

    def frozen_modules(self) -> list[nn.Module]:
        net = self.encoder
        return [net._conv_stem, net._bn0, *net._blocks[:self.frozen_blocks]] if self.frozen_blocks else []

    def train(self, mode: bool = True) -> LungHeartNet:
        super().train(mode)
        for module in self.frozen_modules():  # frozen BatchNorm statistics stay ImageNet's
            module.eval()
        return self

    def fuse_for_inference(self) -> None:
        """Fold every BatchNorm (encoder and decoder) into its convolution, in place; inference only."""
        fuse_lite(self.eval().encoder)
        for up in self.ups:
            for i in (0, 3):  # conv, BatchNorm, ReLU, conv, BatchNorm, ReLU
                up.conv[i], up.conv[i + 1] = fuse_conv_bn_eval(up.conv[i], up.conv[i + 1]), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_blocks):
            x = net._swish(net._bn0(net._conv_stem((x - 0.5) / 0.5)))
        feats = []
        for index, block in enumerate(net._blocks):
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.frozen_blocks):
                x = block(x)
            if index in self.taps:
                feats.append(x)
        x = feats.pop()
        for up in self.ups:
            x = up(x, feats.pop())
        return F.interpolate(self.out(x), scale_factor=2, mode="bilinear", align_corners=False)


@dataclass
class Segmentation:
    probabilities: np.ndarray  # (3, SIZE, SIZE) float32
    masks: dict[str, np.ndarray]  # boolean at SIZE, per structure
    confidence: float
    problems: list[str]

    @property
    def low_confidence(self) -> bool:
        return bool(self.problems) or self.confidence < MIN_CONFIDENCE


def masks_from(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Thresholded at 0.5, the largest component of each structure, holes filled."""
    return {name: fill_holes(largest_component(probabilities[i] > 0.5)) for i, name in enumerate(STRUCTURES)}


def confidence_of(probabilities: np.ndarray) -> float:
    """Mean soft Dice of each map with its own decision: 1.0 when the network is sure of every pixel."""
    scores = []
    for p in probabilities:
        hard = (p > 0.5).astype(np.float32)
        scores.append(float(2 * (p * hard).sum() / max(p.sum() + hard.sum(), 1e-6)))
    return float(np.mean(scores))


def shape_problems(masks: dict[str, np.ndarray]) -> list[str]:
    """What makes the masks implausible for a frontal chest film."""
    area = {k: float(v.mean()) for k, v in masks.items()}
    problems = [f"no {k.replace('_', ' ')} found" for k, a in area.items() if a < 0.01]
    if problems:
        return problems
    cols = {k: np.nonzero(v.any(axis=0))[0] for k, v in masks.items()}
    centre = {k: float(c.mean()) for k, c in cols.items()}
    if not centre["right_lung"] < centre["heart"] < centre["left_lung"]:
        problems.append("the heart is not between the lungs")
    if max(area["right_lung"], area["left_lung"]) > 3.5 * min(area["right_lung"], area["left_lung"]):
        problems.append("the two lung fields differ greatly in size")
    return problems


def cardiothoracic_ratio(masks: dict[str, np.ndarray]) -> tuple[float | None, dict]:
    """Widest horizontal extent of the heart over the widest row of the thorax (outer lung edges)."""
    heart, lungs = masks["heart"], masks["right_lung"] | masks["left_lung"]
    if not heart.any() or not lungs.any():
        return None, {}
    hcols = np.nonzero(heart.any(axis=0))[0]
    cardiac = int(hcols[-1] - hcols[0] + 1)
    rows = np.nonzero(lungs.any(axis=1))[0]
    widths = [(np.nonzero(lungs[r])[0][[0, -1]]) for r in rows]
    spans = np.array([b - a + 1 for a, b in widths])
    at = int(np.argmax(spans))
    return cardiac / float(spans[at]), {"cardiac_width_px": cardiac, "thoracic_width_px": int(spans[at]),
                                         "thoracic_row": int(rows[at]), "work_size": SIZE}


class LearnedSegmenter:
    def __init__(self, net: LungHeartNet, card: dict):
        self.net = net.eval()
        self.card = card

    @classmethod
    def load(cls, path: Path) -> LearnedSegmenter:
        from medai.models.checkpoint import read_tensors

        state, card = read_tensors(path, "pt", "segmentation checkpoint")
        net = LungHeartNet(card.get("variant", "efficientnet-lite0"), card.get("width", 32))
        try:
            net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path.name} does not match the segmentation network: {exc}") from None
        net.fuse_for_inference()
        return cls(net.to(memory_format=torch.channels_last), card)  # oneDNN: 64 -> 46 ms per film here

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        x = stretch(pixels).contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.net(x))[0].contiguous().numpy()

    def segment(self, pixels: np.ndarray) -> Segmentation:
        probs = self.probabilities(pixels)
        masks = masks_from(probs)
        return Segmentation(probs, masks, confidence_of(probs), shape_problems(masks))


def _between(right: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Per row where both lungs are, the columns between their medial edges."""
    out = np.zeros_like(right)
    cols = np.arange(right.shape[1])
    for r in np.flatnonzero(right.any(axis=1) & left.any(axis=1)):
        inner_right, inner_left = np.flatnonzero(right[r])[-1], np.flatnonzero(left[r])[0]
        out[r] = (cols > inner_right) & (cols < inner_left)
    return out


def _body(prepared: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Everything but the dark background connected to the image border."""
    labels, _ = ndi.label(prepared < 0.12)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0]) & ~inside
    return ~outside


def to_anatomy(seg: Segmentation, prepared: np.ndarray):
    """A ``ChestAnatomy`` from the learned masks (``prepared``: the classical method's normalised image,
    for the body outline)."""
    from medai.explain.anatomy import ChestAnatomy

    m = seg.masks
    if any(not m[s].any() for s in STRUCTURES):
        return ChestAnatomy(False, f"{'; '.join(seg.problems) or 'no lungs found'}: this does not look like a "
                            "frontal chest X-ray, so no anatomy map is given")
    mediastinum = _between(m["right_lung"], m["left_lung"]) & ~m["heart"]
    ctr, detail = cardiothoracic_ratio(m)
    low = seg.low_confidence
    detail.update(method="learned (JSRT/SCR masks)", confidence="low" if low else "normal",
                  confidence_score=round(seg.confidence, 3), problems=seg.problems)
    body = _body(prepared, m["right_lung"] | m["left_lung"] | m["heart"])
    return ChestAnatomy(True, "", m["right_lung"], m["left_lung"], m["heart"], mediastinum, body, ctr, detail)


def default_path() -> Path:
    from medai.paths import SHIPPED_MODELS_DIR

    return SHIPPED_MODELS_DIR / "anatomy" / DEFAULT_FILE


def segmenter(path: Path | None = None) -> LearnedSegmenter | None:
    """The shipped segmenter (cached), or None when no weights are installed (classical anatomy then)."""
    path = path or default_path()
    if not path.is_file():
        return None
    from medai.models.checkpoint import load_cached

    return load_cached(LearnedSegmenter.load, path)
