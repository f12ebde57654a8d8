"""One preprocessing path for training, evaluation and serving, plus radiograph-safe augmentation.

decoded float image --resize_to_uint8--> uint8 SxS (what the disk cache stores)
                    --to_tensor-------> float tensor 1xSxS, normalised with the checkpoint's mean/std
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from medai.config import AugmentConfig


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become model input; stored in every checkpoint's model card."""

    image_size: int = 224
    mean: float = 0.5
    std: float = 0.25
    channels: int = 1
    resize: str = "squash-bilinear-antialias"

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std,
                "channels": self.channels, "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(image_size=int(d["image_size"]), mean=float(d["mean"]), std=float(d["std"]),
                   channels=int(d.get("channels", 1)), resize=str(d.get("resize", cls.resize)))


def resize_to_uint8(pixels: np.ndarray, size: int) -> np.ndarray:
    """Float [0, 1] HxW -> uint8 size x size (antialiased bilinear). The aspect ratio is not kept:
    chest radiographs are close to square and heatmaps are mapped back to the original shape."""
    scaled = pixels * np.float32(255.0)  # in place from here: one temporary for a 3.6-MP DICOM, not three
    scaled += np.float32(0.5)
    img = Image.fromarray(np.clip(scaled, 0, 255, out=scaled).astype(np.uint8), mode="L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)  # a writable copy


def to_tensor(arr: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 SxS -> normalised float32 tensor 1xSxS."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    return t.sub_(spec.mean).div_(spec.std).unsqueeze(0)


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Any decoded image -> model input (1xSxS). Used by training, evaluation and serving alike."""
    return to_tensor(resize_to_uint8(pixels, spec.image_size), spec)


def build_augmentation(cfg: AugmentConfig) -> v2.Transform | None:
    """Augmentation applied to the uint8 image tensor (1xSxS) before normalisation."""
    if not cfg.enabled:
        return None
    ops: list[v2.Transform] = []
    if cfg.crop_min_area:
        ops.append(RandomCropBack(cfg.crop_min_area))
    if cfg.rotate_degrees or cfg.translate or cfg.scale:
        ops.append(v2.RandomAffine(degrees=cfg.rotate_degrees, translate=(cfg.translate, cfg.translate),
                                   scale=(1 - cfg.scale, 1 + cfg.scale),
                                   interpolation=v2.InterpolationMode.BILINEAR))
    if cfg.brightness or cfg.contrast:
        ops.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.erase_border:
        ops.append(EraseBorder(cfg.erase_border))
    return v2.Compose(ops) if ops else None


class RandomCropBack(v2.Transform):
    """A random crop of at least ``min_area`` of the image (aspect within 3:4-4:3) resized back to its
    size: markers and borders move or leave the frame, so their place tells the model nothing. A mask
    passed along (``tv_tensors.Mask``) gets the same crop, resized with nearest neighbours."""

    def __init__(self, min_area: float):
        super().__init__()
        self.scale, self.ratio = [min_area, 1.0], [0.75, 4 / 3]

    def make_params(self, flat_inputs: list) -> dict:
        image = flat_inputs[0]
        i, j, h, w = v2.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return {"box": (i, j, h, w), "size": list(image.shape[-2:])}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return v2.functional.resized_crop(inpt, *params["box"], params["size"], antialias=True)

    def extra_repr(self) -> str:
        return f"min_area={self.scale[0]}"


class EraseBorder(v2.Transform):
    """With probability ``p`` per edge, a band of 2-15% of the side along that edge set to one random grey
    level: text, side markers and collimator edges live there, the lungs do not. Masks pass unchanged."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list) -> dict:
        bands = []
        for edge in range(4):
            if float(torch.rand(())) < self.p:
                bands.append((edge, float(torch.empty(()).uniform_(0.02, 0.15)), float(torch.rand(()))))
        return {"bands": bands}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        if isinstance(inpt, tv_tensors.Mask) or not params["bands"]:
            return inpt
        out = inpt.clone()
        h, w = out.shape[-2:]
        for edge, share, level in params["bands"]:
            band = max(1, int((h if edge < 2 else w) * share))
            grey = min(255, int(level * 256)) if out.dtype == torch.uint8 else level
            region = (out[..., :band, :], out[..., h - band:, :], out[..., :, :band], out[..., :, w - band:])[edge]
            region.fill_(grey)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


def augment_and_normalise(arr: np.ndarray, spec: PreprocessSpec, augment: v2.Transform | None,
                          mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 SxS (and optionally a uint8 SxS mask, 255 = inside) -> the normalised 1xSxS input and the
    mask as float 1xSxS in [0, 1], moved by the same crop and affine as the image (nearest neighbours)."""
    mask_t = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0)
    if augment is None:
        image = to_tensor(arr, spec)
    else:
        image_u8 = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)
        if mask_t is None:
            image_u8 = augment(image_u8)
        else:
            image_u8, mask_t = augment(tv_tensors.Image(image_u8), tv_tensors.Mask(mask_t))
            image_u8, mask_t = image_u8.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor)
        image = image_u8.to(torch.float32).div_(255.0).sub_(spec.mean).div_(spec.std)
    return image, None if mask_t is None else mask_t.to(torch.float32).div_(255.0)
