"""An exponential moving average of a model's weights (``train.ema_decay``), the weights validated, kept as
the best checkpoint and shipped when it is on.

Averaging the weights over the last few hundred steps smooths the noise of small batches and noisy labels
(NIH's are text-mined), the way timm's ``ModelEmaV2`` does for ImageNet. Every floating-point entry of the
state dict is averaged, BatchNorm running statistics included; integer buffers are copied. Early on the
decay is held down to ``(1 + updates) / (10 + updates)``, so the average is not dominated by the random or
ImageNet start.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie between 0 and 1, got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s weights after an optimiser step."""
        self.updates += 1
        d = self.current_decay()
        live = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = live[name].detach()
            if avg.dtype.is_floating_point:
                avg.lerp_(value.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
