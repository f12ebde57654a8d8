"""The resume state of a run (``last.pt``): model, optimiser, weight average and loop counters after the
last completed epoch, written atomically each epoch and read back by ``--resume``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medai import runs
from medai.atomic import atomic_path
from medai.training.ema import WeightAverage

log = logging.getLogger(__name__)


def load(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: WeightAverage | None,
         device: torch.device, is_main: bool) -> dict[str, Any]:
    """Restore the saved state into ``model``, ``optimizer`` and ``ema``; the loop state (epoch, step,
    stopper) to continue from, or a fresh one when the run has none."""
    state: dict[str, Any] = {"epoch": 0, "step": 0, "stopper": {}}
    path = run_dir / runs.RESUME_STATE
    if not path.is_file():
        return state
    saved = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    state.update(saved["loop"])
    if ema is not None and "ema" in saved:
        ema.load_state_dict(saved["ema"])
    elif ema is not None:  # a run resumed with averaging it did not have starts the average here
        ema.module.load_state_dict(model.state_dict())
    if is_main:
        runs.truncate_progress(run_dir, state["epoch"])
    # state["epoch"] counts the epochs done: the last one's number, counted from 1 as the logs count
    log.info("resumed %s after epoch %d (step %d)", run_dir.name, state["epoch"], state["step"])
    return state


def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: WeightAverage | None,
         state: dict) -> None:
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": dict(state)}
    if ema:
        saved["ema"] = ema.state_dict()
    with atomic_path(run_dir / runs.RESUME_STATE) as tmp:
        torch.save(saved, tmp)
