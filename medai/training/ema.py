"""An exponential moving average of a model's weights (``train.ema_decay``), the weights validated, kept as
the best checkpoint and shipped when it is on.

Averaging the weights over the last few hundred steps smooths the noise of small batches and noisy labels
(NIH's are text-mined), the way timm's ``ModelEmaV2`` does for ImageNet. Every floating-point entry of the
state dict is averaged, BatchNorm running statistics included; integer buffers are copied.

Early on the decay is held down to ``(1 + n) / (ramp + 1 + n)`` after ``n`` updates, so the average is not
dominated by the random or ImageNet start: its window, ``1 / (1 - decay)`` steps, grows as ``1 + n / ramp``
until it reaches the configured one. ``ramp`` 9 (the default, ``train.ema_ramp``) is TensorFlow's
``(1 + n) / (10 + n)``; it needs about ``9 * window`` updates, 4,490 for a decay of 0.998, so a fine-tune
shorter than that averages over about a ninth of its steps so far, whatever the decay says. ``ramp`` 1 is the
running mean of the start (counted twice) and every update until the window is reached (498 updates for
0.998), then the moving average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float, ramp: float = 9.0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie between 0 and 1, got {decay}")
        if ramp <= 0:
            raise ValueError(f"EMA ramp must be > 0, got {ramp}")
        self.decay, self.ramp = decay, ramp
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (self.ramp + 1 + self.updates))

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
