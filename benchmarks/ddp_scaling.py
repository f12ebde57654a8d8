"""Data-parallel scaling: training images/s for 1 process vs N torchrun processes, same per-process batch.

Each configuration is a real ``python -m medai train`` on nih-cxr14-train-224 (``--nproc-per-node N``
re-launches under torchrun; gloo on CPU, nccl on CUDA). The script follows rank 0's step records and
cancels the run once it has timed enough steps, so only training steps are measured (no validation).
Throughput is counted over all processes, from step ``--skip`` to the last step, data loading included.

    python benchmarks/ddp_scaling.py [--steps 30] [--arch hybrid_cnn_transformer] [--size 128] [--batch 32]

On CPU it compares one process using every core with N processes of cores/N threads each; on a GPU
machine N is the number of GPUs. Scaling efficiency = throughput(N) / (N x throughput(1 process, same
threads per process)).
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

import yaml

from _common import DATA, ROOT, machine, table


def step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "progress.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "step":
            out.append(rec)
    return out


def measure(nproc: int, threads: int, args: argparse.Namespace, home: Path, cache: Path) -> dict:
    import torch

    cfg = {"name": f"ddp-bench-{nproc}x{threads}", "data": {"root": "nih-cxr14-train-224"},
           "preprocess": {"image_size": args.size}, "augment": {"enabled": True},
           "model": {"name": args.arch},
           "train": {"epochs": 1, "batch_size": args.batch, "num_workers": args.workers, "log_every": 1,
                     "bootstrap": 0, "amp": "auto", "device": "cuda" if torch.cuda.is_available() else "cpu"}}
    config = home / f"{cfg['name']}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MEDAI_HOME": str(home), "MEDAI_DATA_DIR": str(DATA), "MEDAI_CACHE_DIR": str(cache),
           "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    runs = home / "results" / "runs"
    before = set(runs.glob("*")) if runs.is_dir() else set()
    proc = subprocess.Popen([sys.executable, "-m", "medai", "train", "--config", str(config), "--nproc-per-node",
                             str(nproc), "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir, steps = None, []
    deadline = time.time() + args.timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if run_dir is None:
            new = set(runs.glob("*")) - before if runs.is_dir() else set()
            run_dir = next(iter(new), None)
            continue
        steps = step_records(run_dir)
        if steps and steps[-1]["step"] >= args.steps:
            (run_dir / "cancel.request").touch()
            break
    proc.wait(timeout=120)
    steps = step_records(run_dir) if run_dir else []
    timed = [s for s in steps if s["step"] >= args.skip]
    if len(timed) < 2:
        raise SystemExit(f"{nproc} process(es): too few steps recorded ({len(steps)}); see {run_dir}")
    seconds = timed[-1]["time"] - timed[0]["time"]
    images = (timed[-1]["step"] - timed[0]["step"]) * args.batch * nproc
    return {"ips": images / seconds, "steps": timed[-1]["step"] - timed[0]["step"], "seconds": seconds}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="hybrid_cnn_transformer")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--nproc", type=int, default=0, help="processes to compare with one (default: GPUs or cores)")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    n = args.nproc or (torch.cuda.device_count() if cuda else cores)
    if n < 2:
        raise SystemExit("needs at least 2 GPUs or 2 CPU cores")
    per = 1 if cuda else max(1, cores // n)
    plan = [(1, per), (n, per)] if cuda else [(1, cores), (1, per), (n, per)]
    with tempfile.TemporaryDirectory() as tmp:
        home, cache = Path(tmp) / "home", Path(tmp) / "cache"
        home.mkdir()
        measure(1, cores, argparse.Namespace(**{**vars(args), "steps": args.skip + 2}), home, cache)  # warm
        results = {(np_, th): measure(np_, th, args, home, cache) for np_, th in plan}
    base = results[(1, per)]["ips"]
    rows = []
    for (np_, th), r in results.items():
        eff = r["ips"] / (np_ * base)
        rows.append([np_, th, np_ * th, r["steps"], f"{r['seconds']:.1f}", f"{r['ips']:.1f}",
                     f"{r['ips'] / results[plan[0]]['ips']:.2f}x", f"{eff:.0%}" if np_ > 1 else "-"])
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"# DDP scaling: {args.arch} at {args.size} px, batch {args.batch} per process, {device}; {machine()}\n")
    print(table(rows, ["processes", "threads/process", "threads total", "timed steps", "seconds",
                       "images/s (all processes)", "vs first row", "scaling efficiency"]))


if __name__ == "__main__":
    main()
