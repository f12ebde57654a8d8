"""What anatomy-guided training (``train.attention_loss``) costs per step: the recipe's model on real Kermany
training films, one training step (forward, loss, backward, AdamW) with and without the Grad-CAM term,
and the one-off cost of a film's chest mask (decode, learned segmentation, resize; then cached).

    .venv/bin/python benchmarks/attention_cost.py [--config configs/hybrid_lite0_pneumonia_attention.yaml] \
        [--steps 6] [--batch 32]

Steps alternate between the two variants on the same batch; the first of each is excluded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import machine, table

from medai.config import load_config
from medai.data.datasets import XrayDataset, load_records
from medai.data.transforms import PreprocessSpec, build_augmentation
from medai.models import create_model
from medai.models.registry import model_kwargs
from medai.training.attention import chest_masks, outside_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/hybrid_lite0_pneumonia_attention.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    cfg = load_config(args.config)
    records = load_records(cfg.data).split(cfg.data.train_split)
    records = records[:: max(1, len(records) // args.batch)][: args.batch]
    spec = PreprocessSpec(cfg.preprocess.image_size, cfg.preprocess.mean, cfg.preprocess.std)
    masks = chest_masks(tempfile.mkdtemp(), spec.image_size)  # an empty cache: every mask is computed
    started = time.perf_counter()
    samples = [XrayDataset(records, spec, None, build_augmentation(cfg.augment), masks)[i] for i in range(len(records))]
    per_film = (time.perf_counter() - started) / len(records)
    images, targets, films = (torch.stack([s[k] for s in samples]) for k in (0, 1, 4))
    kwargs = model_kwargs(cfg.model.name, cfg.model.kwargs, spec.image_size)
    model = create_model(cfg.model.name, targets.shape[1], pretrained=cfg.model.pretrained, **kwargs).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, list[float]] = {"plain": [], "attention": []}
    for step in range(2 * (args.steps + 1)):
        variant = "attention" if step % 2 else "plain"
        t0 = time.perf_counter()
        if variant == "attention":
            logits, outside = outside_share(model, images, targets, films, "multiclass")
        else:
            logits, outside = model(images), None
        loss = torch.nn.functional.cross_entropy(logits, targets.argmax(1))
        (loss if outside is None else loss + cfg.train.attention_loss * outside).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times[variant].append(time.perf_counter() - t0)
    plain, attention = statistics.median(times["plain"]), statistics.median(times["attention"])
    print(f"## Anatomy-guided training cost, {cfg.model.name} at {spec.image_size} px, batch {args.batch} "
          f"({machine()})\n")
    print(table([["training step, plain", f"{plain:.2f} s", f"{args.batch / plain:.1f}"],
                 ["training step, + Grad-CAM outside the chest", f"{attention:.2f} s", f"{args.batch / attention:.1f}"],
                 ["a film and its chest mask, first read (decode, segment; cached after)", f"{per_film * 1000:.0f} ms", "-"]],
                ["what", "median time", "images/s"]))
    print(f"\nratio attention / plain: {attention / plain:.2f}")


if __name__ == "__main__":
    main()
