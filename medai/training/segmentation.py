"""Training and evaluating the lung and heart segmenter on the JSRT films with the SCR manual masks.

Split: one film per patient, so a split by case is patient-disjoint. A case's split is fixed by a hash of
its name (20% test, 10% validation for choosing the epoch, the rest training), the same on every
machine. Augmentation prepares the network for the films it will meet rather than JSRT's clean adult PA
films: rotation, scale and aspect (children's chests are wider), shifts with black or grey collimation
at the borders, gamma, contrast, blur and noise, and bright patches inside the lungs (consolidation,
effusion) that leave the manual masks unchanged.

A run folder holds ``last.pt`` (model, optimiser and epoch: ``--resume`` continues from it), the best
epoch's weights ``best.safetensors`` (with its card), ``metrics.jsonl`` and ``train.log``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from medai.atomic import atomic_open
from medai.errors import DatasetError
from medai.explain.segmentation import (SIZE, STRUCTURES, LearnedSegmenter, LungHeartNet, cardiothoracic_ratio,
                                        masks_from, stretch_batch)

log = logging.getLogger(__name__)

MASK_FOLDERS = {"right_lung": "right_lung", "left_lung": "left_lung", "heart": "heart"}


def split_of(case: str) -> str:
    bucket = int(hashlib.sha256(case.encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


def cases(root: Path, split: str | None = None) -> list[str]:
    images = root / "images"
    if not images.is_dir():
        raise DatasetError(f"{root} is not the JSRT/SCR mask set (no images/ folder)")
    names = sorted(p.stem for p in images.glob("*.png")
                   if all((root / "masks" / folder / p.name).is_file() for folder in MASK_FOLDERS.values()))
    return [n for n in names if split is None or split_of(n) == split]


def load_case(root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    """The film as float [0, 1] at SIZE and its masks (3, SIZE, SIZE) in STRUCTURES order."""
    def read(path: Path) -> np.ndarray:
        img = Image.open(path).convert("L")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float32) / 255.0
    masks = np.stack([read(root / "masks" / MASK_FOLDERS[s] / f"{case}.png") > 0.5 for s in STRUCTURES])
    return read(root / "images" / f"{case}.png"), masks.astype(np.float32)


def augment(image: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random training view of a batch (B,1,S,S) and its masks (B,3,S,S)."""
    b = image.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=gen)

    angle = uniform(-15, 15) * math.pi / 180
    scale = uniform(0.75, 1.25)
    aspect = uniform(0.85, 1.2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos / (scale * aspect), -sin / scale, uniform(-0.12, 0.12)], 1),
                         torch.stack([sin / (scale * aspect), cos / scale, uniform(-0.12, 0.12)], 1)], 1)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    fill = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5) * uniform(0, 0.6).view(b, 1, 1, 1)
    image = F.grid_sample(image - fill, grid, align_corners=False, padding_mode="zeros") + fill
    masks = (F.grid_sample(masks, grid, align_corners=False) > 0.5).float()
    lungs = masks[:, :2].amax(dim=1, keepdim=True)
    blobs = _blobs(b, gen) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    image = image + blobs * lungs * uniform(0.2, 0.7).view(b, 1, 1, 1)
    gamma = uniform(0.6, 1.6).view(b, 1, 1, 1)
    image = image.clamp(0, 1) ** gamma
    image = (image - 0.5) * uniform(0.7, 1.3).view(b, 1, 1, 1) + 0.5 + uniform(-0.1, 0.1).view(b, 1, 1, 1)
    if torch.rand(1, generator=gen).item() < 0.3:
        image = F.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    image = image + torch.randn(image.shape, generator=gen) * uniform(0, 0.04).view(b, 1, 1, 1)
    return _collimate(image.clamp(0, 1), gen), masks


def _blobs(b: int, gen: torch.Generator) -> torch.Tensor:
    """Soft bright ellipses, 1-3 per image, in [0, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    out = torch.zeros(b, 1, SIZE, SIZE)
    for _ in range(3):
        cy, cx = torch.rand(b, 1, 1, generator=gen) * 0.6 + 0.2, torch.rand(b, 1, 1, generator=gen) * 0.6 + 0.2
        ry, rx = torch.rand(b, 1, 1, generator=gen) * 0.15 + 0.05, torch.rand(b, 1, 1, generator=gen) * 0.15 + 0.05
        out[:, 0] = torch.maximum(out[:, 0], torch.exp(-(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)))
    return out


def _collimate(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Black bands of up to 8% at random sides (tight collimation, scanner margins)."""
    for i in range(image.shape[0]):
        if torch.rand(1, generator=gen).item() < 0.4:
            top, bottom, left, right = (int(v) for v in (torch.rand(4, generator=gen) * 0.08 * SIZE))
            image[i, :, :top] = 0
            image[i, :, SIZE - bottom:] = 0
            image[i, :, :, :left] = 0
            image[i, :, :, SIZE - right:] = 0
    return image


def loss_fn(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice, averaged over the three structures."""
    probs = torch.sigmoid(logits)
    inter = (probs * masks).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (probs.sum(dim=(2, 3)) + masks.sum(dim=(2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + dice.mean()


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))


@torch.inference_mode()
def evaluate(net: LungHeartNet, root: Path, split: str) -> dict:
    """Dice per structure (and the CTR from the manual vs the predicted masks) on one split."""
    segmenter = LearnedSegmenter(net, {})  # the inference path itself (eval mode; training resets it)
    scores: dict[str, list[float]] = {s: [] for s in STRUCTURES}
    ctr_error = []
    for case in cases(root, split):
        image, truth = load_case(root, case)
        pred = masks_from(segmenter.probabilities(image))
        for i, s in enumerate(STRUCTURES):
            scores[s].append(dice(pred[s], truth[i] > 0.5))
        ctr_true, _ = cardiothoracic_ratio({s: truth[i] > 0.5 for i, s in enumerate(STRUCTURES)})
        ctr_pred, _ = cardiothoracic_ratio(pred)
        if ctr_true is not None and ctr_pred is not None:
            ctr_error.append(abs(ctr_true - ctr_pred))
    out = {s: float(np.mean(v)) for s, v in scores.items()}
    out["lungs"] = float(np.mean(scores["right_lung"] + scores["left_lung"]))
    out["ctr_abs_error"] = float(np.mean(ctr_error)) if ctr_error else None
    out["cases"] = len(scores["heart"])
    return out


@dataclass
class SegConfig:
    data: Path
    out: Path
    epochs: int = 60
    batch_size: int = 16
    lr: float = 2e-3
    frozen_blocks: int = 3
    width: int = 32
    seed: int = 0
    pretrained: str | None = "imagenet-efficientnet-lite0"
    max_cases: int | None = None  # a quick run on the first training cases (tests)


def _build(cfg: SegConfig) -> tuple[LungHeartNet, torch.optim.Optimizer]:
    from medai.models.pretrained import load_pretrained

    net = LungHeartNet(width=cfg.width, frozen_blocks=cfg.frozen_blocks)
    if cfg.pretrained:
        load_pretrained(net.encoder, cfg.pretrained)
    frozen = {id(p) for m in net.frozen_modules() for p in m.parameters()}
    params = [p for p in net.parameters() if id(p) not in frozen]
    for p in net.parameters():
        p.requires_grad_(id(p) not in frozen)
    return net, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)


def _log_line(cfg: SegConfig, text: str) -> None:
    log.info(text)
    with open(cfg.out / "train.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def train(cfg: SegConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train (or continue) a run; returns the best epoch's validation scores. ``stop_after``: leave after
    that many epochs of this call, as a killed run would (tests)."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    net, opt = _build(cfg)
    data = [load_case(cfg.data, c) for c in cases(cfg.data, "train")[:cfg.max_cases]]
    if not data:
        raise DatasetError(f"no training cases with all masks under {cfg.data}")
    images = torch.from_numpy(np.stack([d[0] for d in data]))[:, None]
    masks = torch.from_numpy(np.stack([d[1] for d in data]))
    start, best = 0, {"score": -1.0}
    if resume and (cfg.out / "last.pt").is_file():
        state = torch.load(cfg.out / "last.pt", map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best = state["epoch"] + 1, state["best"]
        _log_line(cfg, f"resumed after epoch {state['epoch']}")
    steps = math.ceil(len(images) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                last_epoch=start * steps - 1 if start else -1)
    for epoch in range(start, cfg.epochs if stop_after is None else min(cfg.epochs, start + stop_after)):
        best = _epoch(cfg, net, opt, sched, images, masks, epoch, best)
    return best


def _epoch(cfg: SegConfig, net: LungHeartNet, opt, sched, images, masks, epoch: int, best: dict) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(images), generator=gen)
    net.train()
    t0, losses = time.time(), []
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        x, y = augment(images[idx], masks[idx], gen)
        loss = loss_fn(net(stretch_batch(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    val = evaluate(net, cfg.data, "val")
    score = (val["lungs"] + val["heart"]) / 2
    row = {"epoch": epoch, "loss": float(np.mean(losses)), "img_per_s": len(order) / (time.time() - t0),
           **{f"val_{k}": v for k, v in val.items()}}
    if score > best["score"]:
        best = {"score": score, "epoch": epoch, "val": val}
        save(net, cfg, cfg.out / "best.safetensors", {"best_epoch": epoch, "val": val})
    with open(cfg.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    _log_line(cfg, f"epoch {epoch}: loss {row['loss']:.4f}, val lungs {val['lungs']:.4f} heart "
              f"{val['heart']:.4f}, {row['img_per_s']:.1f} img/s")
    with atomic_open(cfg.out / "last.pt", "wb") as fh:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best}, fh)
    return best


def card_for(cfg: SegConfig, extra: dict) -> dict:
    return {"kind": "segmentation", "structures": list(STRUCTURES), "variant": "efficientnet-lite0",
            "width": cfg.width, "input_size": SIZE, "starting_weights": cfg.pretrained,
            "training": {"dataset": "jsrt-scr-masks", "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                         "lr": cfg.lr, "frozen_blocks": cfg.frozen_blocks, "seed": cfg.seed,
                         "split": "sha256(case) % 10: 0-1 test, 2 val, 3-9 train"},
            "data_terms": ("JSRT database (Shiraishi et al., AJR 2000) under JSRT's research and education terms; "
                           "SCR masks: van Ginneken, Stegmann, Loog, Medical Image Analysis 10(1), 2006"),
            **extra}


def save(net: LungHeartNet, cfg: SegConfig, path: Path, extra: dict, half: bool = False) -> None:
    from medai.models.checkpoint import write_tensors

    state = {k: v.half() if half and v.is_floating_point() else v for k, v in net.state_dict().items()}
    write_tensors(path, state, card_for(cfg, extra))
