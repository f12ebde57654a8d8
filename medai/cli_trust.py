"""``medai anatomy`` (train, evaluate and ship the learned lung and heart segmenter on the JSRT/SCR masks) and
``medai gate fit`` (fit the input gate that refuses images a model cannot read)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from medai.errors import MedaiError


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("anatomy", help="train, evaluate and ship the lung/heart segmentation model")
    asub = a.add_subparsers(dest="anatomy_command", required=True)
    t = asub.add_parser("train", help="train on the JSRT films with the SCR masks (resumable)")
    t.add_argument("--data", required=True, help="the jsrt-scr-masks folder")
    t.add_argument("--out", required=True, help="run folder (last.pt, best.safetensors, train.log)")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--frozen-blocks", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--from-scratch", action="store_true", help="random encoder instead of ImageNet weights")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    e = asub.add_parser("evaluate", help="Dice per structure on a split of the JSRT/SCR masks")
    e.add_argument("checkpoint", nargs="?", help="default: the shipped segmenter")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    s = asub.add_parser("ship", help="install a run's best weights (fp16) as the shipped segmenter")
    s.add_argument("run", help="the run folder")
    s.add_argument("--data", required=True, help="the jsrt-scr-masks folder (the card gets the test Dice)")
    g = sub.add_parser("gate", help="fit the input gate on the shared data")
    gsub = g.add_subparsers(dest="gate_command", required=True)
    gf = gsub.add_parser("fit", help="fit on the real images of a shared data folder and install it")
    gf.add_argument("--data", required=True, help="the shared data folder (../shared/data)")
    gf.add_argument("--out", help="default: the shipped models/gate/input-gate.safetensors")
    gf.add_argument("--cache", help="an .npz of the fitting images' features: read when it exists, else written")


def run(args: argparse.Namespace) -> int:
    from medai.explain import segmentation as seg
    from medai.training import segmentation as train

    if args.anatomy_command == "train":
        cfg = train.SegConfig(data=Path(args.data), out=Path(args.out), epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, frozen_blocks=args.frozen_blocks, seed=args.seed,
                              pretrained=None if args.from_scratch else "imagenet-efficientnet-lite0")
        best = train.train(cfg, resume=args.resume)
        print(json.dumps(best, indent=2))
        return 0
    if args.anatomy_command == "evaluate":
        path = Path(args.checkpoint) if args.checkpoint else seg.default_path()
        if not path.is_file():
            raise MedaiError(f"no segmentation checkpoint at {path}")
        print(json.dumps(train.evaluate(seg.LearnedSegmenter.load(path).net, Path(args.data), args.split), indent=2))
        return 0
    best = Path(args.run) / "best.safetensors"
    if not best.is_file():
        raise MedaiError(f"{args.run} has no best.safetensors (train first)")
    model = seg.LearnedSegmenter.load(best)
    card = model.card
    cfg = train.SegConfig(data=Path(args.data), out=Path(args.run), **{k: card["training"][k] for k in (
        "epochs", "batch_size", "lr", "frozen_blocks", "seed")}, width=card["width"],
        pretrained=card.get("starting_weights"))
    test = train.evaluate(model.net, Path(args.data), "test")
    extra = {k: card[k] for k in ("best_epoch", "val") if k in card}
    train.save(model.net, cfg, seg.default_path(), {**extra, "test": test}, half=True)
    shutil.copyfile(Path(args.run) / "metrics.jsonl", seg.default_path().with_name("training-metrics.jsonl"))
    print(f"shipped {seg.default_path()} (test Dice: lungs {test['lungs']:.4f}, heart {test['heart']:.4f})")
    return 0


def run_gate(args: argparse.Namespace) -> int:
    import datetime as dt

    import numpy as np

    from medai import gate
    from medai.atomic import atomic_open
    from medai.models.checkpoint import write_tensors
    from medai.training import gate as fitting

    sets = [s for s in fitting.image_sets(Path(args.data)) if s.role == "fit" and s.loaders]
    if not sets:
        raise MedaiError(f"no fitting images under {args.data}")
    cache = Path(args.cache) if args.cache else None
    features = dict(np.load(cache)) if cache and cache.is_file() else {}
    for image_set in sets:
        if len(features.get(image_set.name, ())) != len(image_set.loaders):
            features[image_set.name] = fitting.features_of(image_set)
        print(f"{image_set.name}: {len(image_set.loaders)} images")
    if cache:
        with atomic_open(cache, "wb") as fh:
            np.savez(fh, **features)
    arrays, card = fitting.fit(features, {s.name: s.kind for s in sets})
    card["fitted_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = write_tensors(Path(args.out) if args.out else gate.gate_path(), arrays, card)
    print(f"wrote {out}")
    return 0
