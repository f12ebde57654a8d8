"""The training loop, readable top to bottom: train_one_epoch and predict over a loader."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medai.config import TrainConfig
from medai.precision import Precision


def make_loss(kind: str, train_targets: np.ndarray, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """BCE with per-class ``pos_weight`` (multi-label) or cross-entropy, optionally class-weighted; both with
    ``label_smoothing``."""
    pos = train_targets.sum(0)
    n = len(train_targets)
    if kind == "multilabel":
        weight = None
        if cfg.class_weighting:
            weight = torch.tensor(np.clip((n - pos) / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32)
            weight = weight.to(device)
        return _SmoothedBCE(weight, cfg.label_smoothing)
    weight = None
    if cfg.class_weighting:
        w = n / (len(pos) * np.maximum(pos, 1))
        weight = torch.tensor(w / w.mean(), dtype=torch.float32).to(device)
    return _SoftTargetCE(weight, cfg.label_smoothing)


class _SmoothedBCE(nn.Module):
    """Multi-label BCE on logits whose 0/1 targets are moved ``label_smoothing / 2`` towards 0.5 (each finding
    is a two-class problem, smoothed as cross-entropy smooths two classes): for text-mined labels, a wrong
    label costs a bounded loss."""

    def __init__(self, pos_weight: torch.Tensor | None, label_smoothing: float):
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, target * (1 - self.smoothing) + self.smoothing / 2 if self.smoothing else target)


class _SoftTargetCE(nn.Module):
    """Cross-entropy on one-hot target vectors (the uniform sample shape)."""

    def __init__(self, weight: torch.Tensor | None, label_smoothing: float):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target.argmax(dim=1))


def loader_worker_init(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the trainer: a stop sent to the whole process group (``kill``
    of the group, ``timeout``, a service manager) then ends the run as cancelled, after its step, instead
    of killing a worker mid-batch and failing the run."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the base learning rate."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EarlyStopping:
    """Stop when the monitored score (val macro AUROC) has not improved by ``min_delta`` for
    ``patience`` epochs. ``patience=None`` never stops."""

    patience: int | None
    min_delta: float = 0.0
    best: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float | None, epoch: int) -> bool:
        """Record an epoch's score; True when it is a new best."""
        if score is not None and score > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state(self) -> dict[str, float | int]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}


@dataclass
class StepClock:
    """Global step, throughput and ETA (wall time per step, data loading included)."""

    step: int
    total_steps: int
    world_size: int = 1  # processes stepping in lockstep: each step moves world_size batches
    timed_steps: int = 0
    images: int = 0
    seconds: float = 0.0

    def tick(self, batch: int, seconds: float) -> None:
        self.step += 1
        self.timed_steps += 1
        self.images += batch * self.world_size
        self.seconds += seconds

    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def eta_s(self) -> float | None:
        if not self.timed_steps:
            return None
        return self.seconds / self.timed_steps * max(0, self.total_steps - self.step)


def _loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor | None,
          loss_fn: nn.Module, prec: Precision, cfg: TrainConfig,
          attention: Callable | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's loss, and the heatmap share outside the masks when the attention term is on."""
    outside = None
    with prec.autocast():
        if masks is not None:
            logits, outside = attention(model, images, targets, masks)
        else:
            logits = model(images)
    loss = loss_fn(logits.float(), targets)
    return (loss if outside is None else loss + cfg.attention_loss * outside), outside


def _optimise(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, prec: Precision,
              cfg: TrainConfig) -> None:
    """Backward (scaled for fp16), gradient clipping and the optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    if prec.scaler is not None:
        prec.scaler.scale(loss).backward()
        prec.scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if prec.scaler is not None:
        prec.scaler.step(optimizer)
        prec.scaler.update()
    else:
        optimizer.step()


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, prec: Precision, cfg: TrainConfig, clock: StepClock, epoch: int,
                    lr_at: Callable[[int], float], on_step: Callable[[dict], None],
                    should_stop: Callable[[], bool], seen: list[str] | None = None,
                    after_step: Callable[[], None] | None = None,
                    attention: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
                    ) -> dict[str, float]:
    """One epoch; ``seen`` (when given) collects the ids of the images trained on, in order;
    ``after_step`` (when given) runs after every optimiser step (the weight average's update);
    ``attention`` (when given, with batches that carry masks) returns the logits and the heatmap share
    outside the masks, added to the loss with weight ``cfg.attention_loss``
    (:func:`medai.training.attention.outside_share`)."""
    model.train()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    total_loss, count, outside_sum, outside_n = 0.0, 0, 0.0, 0
    t_last = time.perf_counter()
    for i, batch in enumerate(loader):
        images, targets, ids = batch[0], batch[1], batch[2]
        if cfg.max_steps_per_epoch is not None and i >= cfg.max_steps_per_epoch:
            break
        if should_stop():
            return {"loss": total_loss / max(count, 1), "stopped": 1.0}
        if seen is not None:
            seen.extend(ids)
        images = images.to(prec.device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(prec.device, non_blocking=True)
        lr = lr_at(clock.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        masks = batch[4].to(prec.device, non_blocking=True) if attention is not None and len(batch) > 4 else None
        loss, outside = _loss(model, images, targets, masks, loss_fn, prec, cfg, attention)
        if outside is not None:
            outside_sum, outside_n = outside_sum + outside.item(), outside_n + 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {clock.step}; lower "
                                     "train.lr or turn train.amp off")
        _optimise(loss, model, optimizer, prec, cfg)
        if after_step is not None:
            after_step()
        size = images.shape[0]
        total_loss += loss.item() * size
        count += size
        now = time.perf_counter()
        clock.tick(size, now - t_last)
        t_last = now
        if clock.step % cfg.log_every == 0:
            record = {"type": "step", "epoch": epoch, "step": clock.step, "loss": loss.item(), "lr": lr,
                      "images_per_s": clock.images_per_s(), "eta_s": clock.eta_s(), "time": time.time()}
            if outside is not None:
                record["cam_outside"] = outside.item()
            on_step(record)
    result = {"loss": total_loss / max(count, 1)}
    if outside_n:
        result["cam_outside"] = outside_sum / outside_n
    return result
