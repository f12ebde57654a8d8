"""Device and mixed-precision resolution: fp16 + GradScaler or bf16 on CUDA, bf16 on CPU when asked."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from medai.errors import ConfigError


@dataclass
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = full float32
    scaler: torch.amp.GradScaler | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'train.device': {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' asks for CUDA, but no CUDA GPU is available here; "
                          "use 'auto' or 'cpu'")
    return device


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """``auto``: bf16 (or fp16 where bf16 is missing) on CUDA, fp32 on CPU."""
    if amp == "auto":
        if device.type != "cuda":
            return Precision(device, None, None)
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return Precision(device, None, None)
    if amp == "bf16":
        return Precision(device, torch.bfloat16, None)
    if device.type != "cuda":
        raise ConfigError("config key 'train.amp': fp16 autocast needs a CUDA GPU; use bf16 on CPU")
    return Precision(device, torch.float16, torch.amp.GradScaler("cuda"))
