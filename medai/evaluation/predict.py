"""Predictions over a data loader: the one forward loop that validation, final evaluation and
``python -m medai evaluate`` share."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medai.precision import Precision


@torch.no_grad()
def predict_loader(model: nn.Module, loader: DataLoader, prec: Precision, channels_last: bool = False,
                   loss_fn: nn.Module | None = None) -> dict[str, object]:
    """Logits, targets and ids over a loader (no augmentation, no gradients)."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    logits, targets, ids, patients, loss_sum = [], [], [], [], 0.0
    for images, target, batch_ids, batch_patients in loader:
        images = images.to(prec.device, memory_format=memory_format)
        with prec.autocast():
            out = model(images).float()
        if loss_fn is not None:
            loss_sum += loss_fn(out, target.to(prec.device)).item() * len(images)
        logits.append(out.cpu().numpy())
        targets.append(target.numpy())
        ids.extend(batch_ids)
        patients.extend(batch_patients)
    n = sum(len(t) for t in targets)
    return {"logits": np.concatenate(logits), "targets": np.concatenate(targets), "ids": ids,
            "patients": patients, "loss": loss_sum / max(n, 1)}
