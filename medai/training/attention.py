"""Anatomy-guided training: a loss on the share of each class's Grad-CAM that falls outside the chest.

A classifier free to use any pixel learns whatever separates the classes most cheaply; on Kermany films
that is the border, the side markers and the child's size, and its heatmaps sit on the chest no more often
than a flat map would (``benchmarks/heatmap_on_chest.py``). With ``train.attention_loss: w`` the training
loss becomes ``classification + w * outside``:

- every training film gets the learned lungs + heart (``medai.explain.segmentation``) at the input size,
  cached on disk by file content and segmentation weights, and moved by the same crop and affine as the
  image (:class:`ChestMasks`);
- each step computes the heatmap the Analyze page shows, differentiably: the gradient of the class score
  at the model's CAM target layer (``create_graph=True``); Grad-CAM takes its spatial mean as channel
  weights, HiResCAM (``model.cam_method: hirescam``) multiplies it with the activation element-wise; the
  ReLU of the sum over channels (:func:`outside_share`);
- ``outside`` is the CAM's mass outside the mask over its total, averaged over films and classes. Scores are
  the CAM targets of :mod:`medai.explain.cam`: the log-probability of each class (softmax heads), the logit
  of each positive finding summed (multi-label heads; films with none add nothing).

Films without a usable segmentation (not a frontal chest film, low confidence, MedMNIST arrays) get an
all-inside mask and add nothing. This is the "right for the right reasons" idea (Ross et al., 2017) with
the heatmap the reader sees instead of input gradients.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medai.data.cache import DecodeCache
from medai.config import ATTENTION_CAM_METHODS
from medai.errors import ConfigError
from medai.imaging import resize_float

log = logging.getLogger(__name__)

def method_for(cam_method: str | None) -> str:
    """The heatmap the term trains (and the model then explains with): ``model.cam_method`` of the config
    when it is one of ``ATTENTION_CAM_METHODS``, else Grad-CAM (config validation refuses any other)."""
    return cam_method if cam_method in ATTENTION_CAM_METHODS else "gradcam"


class ChestMasks:
    """Record -> uint8 SxS mask of the learned lungs and heart (255 inside), or None when the film has no
    usable segmentation (cached as all 255). Picklable: DataLoader workers load the segmenter themselves, once."""

    def __init__(self, cache_root: str | Path, size: int, weights: Path):
        self.cache = DecodeCache(cache_root)
        self.size, self.weights = size, Path(weights)
        digest = hashlib.blake2b(self.weights.read_bytes(), digest_size=6).hexdigest()
        self.kind = f"chest-mask-{digest}"  # new segmentation weights never reuse old masks

    def everywhere(self) -> np.ndarray:
        return np.full((self.size, self.size), 255, np.uint8)

    def __call__(self, source: str | tuple) -> np.ndarray | None:
        """The mask, or None when there is none (the dataset then passes an all-inside mask that no
        augmentation touched: a rotated all-255 mask would have zero corners and count as a segmentation)."""
        if isinstance(source, tuple):  # an array inside a .npz file: no film to segment
            return None
        mask = self.cache.cached(source, self.size, self.kind, lambda data: self.compute(data, Path(source).name))
        return None if mask.min() == 255 else mask

    def compute(self, data: bytes, name: str) -> np.ndarray:
        from medai.data.io import decode_image
        from medai.explain.segmentation import segmenter

        seg = segmenter(self.weights).segment(decode_image(data, name=name).pixels)
        m = seg.masks
        if seg.problems or seg.low_confidence or not all(v.any() for v in m.values()):
            return self.everywhere()
        inside = (m["right_lung"] | m["left_lung"] | m["heart"]).astype(np.float32)
        return np.clip(resize_float(inside, (self.size, self.size)) * 255 + 0.5, 0, 255).astype(np.uint8)


def _class_scores(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """Per-film scores whose CAMs are penalised (one tensor of shape (B,) per map)."""
    if kind == "multilabel":
        return [(logits * targets).sum(dim=1)]
    logp = torch.log_softmax(logits.float(), dim=1)
    return [logp[:, c] for c in range(logits.shape[1])]


def outside_share(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                  kind: str, forward=None, method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits and the mean share of the heatmap (``method``, one of ``ATTENTION_CAM_METHODS``) outside
    ``masks`` (B x 1 x S x S in [0, 1]) over the films that have a mask and the maps of each (differentiable), or None
    when no film counts.
    ``forward`` (default ``model``) runs the forward pass (the caller's autocast around it)."""
    layer = model.cam_target_layers()[0]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = (forward or model)(images)
    finally:
        handle.remove()
    raw = seen[-1]
    films = masks.flatten(1).amin(dim=1) < 1.0  # an all-inside mask: no segmentation, nothing to learn
    if kind == "multilabel":
        films &= targets.sum(dim=1) > 0
    if not raw.requires_grad or not bool(films.any()):
        return logits, None
    shares = []
    for cam in grad_cams(model, raw, logits, targets, kind, method):
        inside = F.adaptive_avg_pool2d(masks.to(cam.dtype), cam.shape[-2:])[:, 0]
        total = cam.flatten(1).sum(dim=1)
        outside = (cam * (1 - inside)).flatten(1).sum(dim=1) / torch.where(total > 0, total, 1.0)
        shares.append(outside[films & (total > 0)])
    kept = torch.cat(shares)
    return logits, (kept.mean() if kept.numel() else None)


def grad_cams(model: nn.Module, raw: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
              kind: str, method: str = "gradcam") -> list[torch.Tensor]:
    """Grad-CAM or HiResCAM (``method``; before upsampling: B x h x w at the target layer) of each score of
    :func:`_class_scores`, from the target layer's output ``raw``; differentiable (second order)."""
    activations = model.cam_reshape_transform(raw).float()
    cams = []
    for score in _class_scores(logits, targets, kind):
        (grad,) = torch.autograd.grad(score.sum(), raw, create_graph=True)
        weights = model.cam_reshape_transform(grad).float()
        if method != "hirescam":  # Grad-CAM: one weight per channel
            weights = weights.mean(dim=(2, 3), keepdim=True)
        cams.append(F.relu((weights * activations).sum(dim=1)))
    return cams


def chest_masks(cache_root: str | Path, size: int) -> ChestMasks:
    """The masks of the shipped segmenter, or a clear error when its weights are not installed."""
    from medai.explain.segmentation import default_path

    weights = default_path()
    if not weights.is_file():
        raise ConfigError(f"train.attention_loss needs the lung and heart segmentation weights ({weights}); "
                          "train them with `medai anatomy train` or set train.attention_loss: 0")
    return ChestMasks(cache_root, size, weights)


def term(model: nn.Module, kind: str, method: str = "gradcam"):
    """What ``train_one_epoch`` calls as ``attention``: the CAM layer of ``model``, the forward of the
    module it trains (``net``, the same model or its wrapper), the heatmap ``method``."""
    return lambda net, images, targets, masks: outside_share(model, images, targets, masks, kind, net, method)


def report(result: dict, record: dict, epoch: int) -> None:
    """Put the epoch's mean share outside the chest into its progress ``record``; warn when no film counted."""
    if "cam_outside" in result:
        record["train_cam_outside"] = result["cam_outside"]
    else:
        log.warning("train.attention_loss: no training film had a usable chest segmentation in epoch %d, so "
                    "the attention term added nothing (it needs frontal chest films)", epoch + 1)
