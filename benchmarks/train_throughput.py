"""Training throughput of our trainer vs a bare reference loop, per architecture at 224 px, and the data
pipeline alone (cold decode vs warm decode cache).

    .venv/bin/python benchmarks/train_throughput.py [--steps 12] [--batch 16] [--archs densenet121 ...]

* ours: `python -m medai train` on real NIH ChestX-ray14 images (nih-cxr14-train-224, 14 findings) with the
  recipe's settings (augmentation on, 2 loader workers, decode cache warm), images/s from the run's own
  step records, first step excluded.
* bare: the same model, AdamW, BCE-with-logits, batch and step count on one preloaded random batch, no
  data loading, no logging; first step excluded.
* memory: in a second, shorter run (6 steps), the `medai train` process's peak RSS (high-water mark) and
  the peak PSS of it with its loader workers, sampled every second from /proc.
* data: the trainer's Dataset + DataLoader alone (same workers, batch, augmentation), first with an empty
  decode cache (JPEG decode + resize), then with it warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import DATA, ROOT, machine, table

from medai.config import load_config
from medai.data.cache import DecodeCache
from medai.data.datasets import XrayDataset, load_records
from medai.data.transforms import PreprocessSpec, build_augmentation
from medai.models import create_model

RECIPES = {"densenet121": "densenet_nih14.yaml", "hybrid_cnn_transformer": "hybrid_nih14.yaml",
           "vit_small": "vit_nih14.yaml"}


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (the DataLoader workers)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measuring_memory(cmd: list[str], env: dict[str, str], every_s: float) -> tuple[float, float]:
    """Run ``cmd``; (peak RSS of its main process, peak PSS of it and its children summed) in MB. The RSS
    peak is the kernel's high-water mark; the PSS sum is sampled every ``every_s`` seconds. PSS shares the
    pages that forked loader workers have in common with their parent, so the sum counts them once, as RSS
    summed would not. Reading PSS walks a process's page tables (about 40 ms for 1.4 GB), so the timed
    run is a separate one, unsampled."""
    peak_rss = peak_pss = 0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            peak_rss = max(peak_rss, _kb(f"/proc/{proc.pid}/status", "VmHWM:"))
            if every_s:
                peak_pss = max(peak_pss, sum(_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in _tree(proc.pid)))
            time.sleep(every_s or 0.2)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read().decode(errors='replace')[-2000:]}")
    return peak_rss / 1024, peak_pss / 1024


def ours(arch: str, steps: int, batch: int, home: Path, cache: Path, memory: bool = False
         ) -> tuple[float, float, float]:
    """(images/s, peak RSS MB of the trainer process, peak PSS MB of trainer + loader workers; 0 unless
    ``memory``)."""
    tree = yaml.safe_load((ROOT / "configs" / RECIPES[arch]).read_text())
    tree["data"].update({"max_samples": steps * batch + 64, "eval_root": None})
    tree["train"].update({"epochs": 1, "batch_size": batch, "max_steps_per_epoch": steps, "log_every": 1,
                          "bootstrap": 0, "early_stopping_patience": None, "warmup_epochs": 0.0})
    config = home / f"{arch}.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "MEDAI_HOME": str(home), "MEDAI_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    rss, pss = run_measuring_memory([sys.executable, "-m", "medai", "train", "--config", str(config)], env,
                                    every_s=1.0 if memory else 0.0)
    run = max((home / "results" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    records = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r.get("type") == "step"]
    return batch * (len(times) - 1) / (times[-1] - times[0]), rss, pss


def bare(arch: str, steps: int, batch: int) -> float:
    kwargs = {} if arch == "densenet121" else {"image_size": 224}
    model = create_model(arch, num_classes=14, **kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x, y = torch.randn(batch, 1, 224, 224), torch.randint(0, 2, (batch, 14)).float()

    def step() -> None:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step()
    started = time.perf_counter()
    for _ in range(steps - 1):
        step()
    return batch * (steps - 1) / (time.perf_counter() - started)


def data_pipeline(n: int, batch: int, cache: Path) -> tuple[float, float]:
    cfg = load_config(ROOT / "configs" / "densenet_nih14.yaml")
    cfg.data.max_samples = None
    records = [r for r in load_records(cfg.data).records if r.split == "train"][:n]
    spec = PreprocessSpec(224, cfg.preprocess.mean, cfg.preprocess.std)
    rates = []
    for _ in ("cold", "warm"):
        ds = XrayDataset(records, spec, DecodeCache(cache), build_augmentation(cfg.augment))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=cfg.train.num_workers)
        started = time.perf_counter()
        for _ in loader:
            pass
        rates.append(len(records) / (time.perf_counter() - started))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--archs", nargs="+", default=list(RECIPES))
    args = parser.parse_args()
    os.environ.setdefault("MEDAI_DATA_DIR", str(DATA))
    with tempfile.TemporaryDirectory() as tmp:
        home, cache = Path(tmp) / "home", Path(tmp) / "cache"
        home.mkdir()
        cold, warm = data_pipeline(args.steps * args.batch + 64, args.batch, cache)  # also warms the cache
        rows = []
        for arch in args.archs:
            (o, _, _), b = ours(arch, args.steps, args.batch, home, cache), bare(arch, args.steps, args.batch)
            _, rss, pss = ours(arch, 6, args.batch, home, cache, memory=True)
            rows.append([arch, args.batch, f"{o:.2f}", f"{b:.2f}", f"{o / b:.2f}", f"{warm:.1f}",
                         "compute" if warm > 3 * o else "data", f"{rss:.0f}", f"{pss:.0f}"])
    print(f"## Training throughput, 224 px, NIH ChestX-ray14 ({machine()})\n")
    print(f"ours = `python -m medai train` (recipe settings, augmentation, 2 loader workers, warm decode cache), "
          f"bare = model + AdamW + BCE on one preloaded batch; {args.steps} steps, first excluded. Data pipeline "
          f"alone (Dataset + DataLoader, 2 workers, augmentation): {cold:.1f} images/s cold (JPEG decode + "
          f"resize), {warm:.1f} images/s with the decode cache warm.\n")
    print(table(rows, ["architecture", "batch", "ours images/s", "bare images/s", "ours/bare",
                       "data alone images/s (warm)", "limited by", "trainer peak RSS MB",
                       "trainer + workers peak PSS MB"]))


if __name__ == "__main__":
    main()
