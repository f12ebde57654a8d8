"""Callbacks feed progress to the run folder (:mod:`medai.runs`) and to screens; the loop never prints."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from medai import runs


class Callback:
    def on_train_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, record: dict[str, Any]) -> None: ...
    def on_epoch(self, record: dict[str, Any]) -> None: ...
    def on_train_end(self, state: str, info: dict[str, Any]) -> None: ...


class ProgressFile(Callback):
    """Appends each record to the run's progress file."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def _append(self, record: dict[str, Any]) -> None:
        runs.append_progress(self.run_dir, record)

    on_step = _append
    on_epoch = _append


class StatusFile(Callback):
    """Keeps the run's status current; a background thread refreshes the heartbeat."""

    def __init__(self, run_dir: Path, heartbeat_s: float = 5.0):
        self.run_dir = run_dir
        self.heartbeat_s = heartbeat_s
        self.status: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.status.update(fields)
            self.status["heartbeat"] = time.time()
            runs.write_status(self.run_dir, self.status)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.update()

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.update(state=runs.RUNNING, pid=os.getpid(), started_at=time.time(), **info)
        self._thread = threading.Thread(target=self._beat, name="medai-heartbeat", daemon=True)
        self._thread.start()

    def on_step(self, record: dict[str, Any]) -> None:
        self.update(epoch=record["epoch"], step=record["step"], eta_s=record.get("eta_s"))

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.update(epoch=record["epoch"], best_val_auroc=record.get("best_val_auroc"),
                    eta_s=record.get("eta_s"))

    def on_train_end(self, state: str, info: dict[str, Any]) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.update(state=state, finished_at=time.time(), **info)


class ProgressBar(Callback):
    """A tqdm bar over the whole run for the CLI."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, info: dict[str, Any]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=info["total_steps"], initial=info.get("start_step", 0), unit="step",
                        dynamic_ncols=True)

    def on_step(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix(epoch=record["epoch"] + 1, loss=f"{record['loss']:.4f}")
            self.bar.refresh()

    def on_epoch(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            auroc = record.get("val_auroc")
            self.bar.write(f"epoch {record['epoch'] + 1}: train loss {record['train_loss']:.4f}, val loss "
                           f"{record['val_loss']:.4f}, val AUROC {auroc if auroc is None else round(auroc, 4)}, "
                           f"mAP {record.get('val_map') and round(record['val_map'], 4)}")

    def on_train_end(self, state: str, info: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
