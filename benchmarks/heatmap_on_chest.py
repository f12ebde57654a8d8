"""Where a model looks: the share of its heatmap that falls on the lungs and the heart (learned anatomy),
over Kermany validation films, for the finding the Analyze page shows first.

    .venv/bin/python benchmarks/heatmap_on_chest.py --checkpoint models/pneumonia-hybrid.safetensors \
        [--checkpoint ...] [--images 100] [--finding PNEUMONIA] [--method gradcam]

Films are taken evenly from both classes (sorted names, every k-th), through the same path as the
Analyze page and the API (`medai.analysis.analyze_and_explain`); a film the input gate refuses or whose
anatomy is not found is counted, not scored. Share = heatmap mass inside the right lung, left lung and
heart masks over its total; "warned" = the films whose share is under 50% (the shortcut warning readers see).
The last row is chance: a flat heatmap, whose share is the lungs' and heart's part of the film's area. A model
scores above it only by preferring the chest.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from _common import DATA, machine, table

from medai.analysis import analyze_and_explain
from medai.explain.anatomy import attention_shares
from medai.inference import Predictor

INSIDE = ("right_lung", "left_lung", "heart")


def films(n: int) -> list:
    val = DATA / "kermany-pneumonia" / "val"
    out = []
    for cls in ("NORMAL", "PNEUMONIA"):
        names = sorted((val / cls).glob("*.jpeg"))
        step = max(1, len(names) // (n // 2))
        out += names[::step][: n // 2]
    return out


def shares(checkpoint: str, paths: list, finding: str, method: str | None, flat: dict[str, float]) -> list[object]:
    """One table row; ``flat`` collects a flat heatmap's share per scored film (the chance row), once per
    film whichever model scored it (the anatomy does not depend on the model)."""
    predictor = Predictor(checkpoint)
    inside, refused, no_anatomy = [], 0, 0
    for path in paths:
        analysis, exp = analyze_and_explain(predictor, "bench", path.read_bytes(), path.name, [finding], method)
        if exp is None:
            refused += 1
        elif finding not in exp.shares:
            no_anatomy += 1
        else:
            inside.append(sum(exp.shares[finding].get(region, 0.0) for region in INSIDE))
            if path.name not in flat:
                uniform = attention_shares(np.ones((64, 64)), exp.anatomy)
                flat[path.name] = sum(uniform.get(region, 0.0) for region in INSIDE)
    head = [checkpoint.rsplit("/", 1)[-1], method or predictor.model.cam_method, len(paths), refused, no_anatomy]
    return head + summary(inside)


def summary(inside: list[float]) -> list[object]:
    if not inside:
        return ["-", "-", "-"]
    return [statistics.mean(inside), statistics.median(inside), f"{sum(s < 0.5 for s in inside) / len(inside):.0%}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--finding", default="PNEUMONIA")
    parser.add_argument("--method", help="CAM method (default: each model's own)")
    args = parser.parse_args()
    paths = films(args.images)
    flat: dict[str, float] = {}
    rows = [shares(c, paths, args.finding, args.method, flat) for c in args.checkpoint]
    rows.append(["chance: a flat heatmap", "-", len(flat), "-", "-", *summary(list(flat.values()))])
    print(f"## Heatmap share on lungs + heart, Kermany val, {args.finding} ({machine()})\n")
    print(table(rows, ["checkpoint", "method", "films", "refused", "no anatomy", "mean share", "median share",
                       "warned (< 50%)"]))


if __name__ == "__main__":
    main()
