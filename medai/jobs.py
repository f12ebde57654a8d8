"""Training jobs started from the dashboard: each is its own OS process (``python -m medai train --queued
<run folder>``, or ``--resume`` once it has trained an epoch), so it outlives page reloads, other sessions and a dashboard restart.

The registry lives in the store (``runs`` table); the truth about a run is its folder (:mod:`medai.runs`).
:func:`refresh` reconciles the two and starts queued jobs while their
device has a free slot (``MEDAI_RUNS_PER_DEVICE``, default 1). A job whose process has died without
finishing (stale heartbeat, no process) is marked ``failed`` with the tail of its log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medai.audit import AuditAction
from medai import runs
from medai.atomic import atomic_path
from medai.config import ExperimentConfig
from medai.errors import ConfigError, MedaiError
from medai.paths import PROJECT_ROOT, env_number, medai_home, resolve_data_path
from medai.runs import CANCELLED, FAILED, FINAL_STATES, QUEUED, RESUMABLE_STATES, RUNNING, log_tail
from medai.store import Store

__all__ = ["Job", "cancel", "get_job", "list_jobs", "log_tail", "refresh", "register", "resume", "submit"]
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def runs_per_device() -> int:
    return max(1, int(env_number("MEDAI_RUNS_PER_DEVICE", 1)))


def stale_after_s() -> float:
    """A heartbeat older than this (the trainer beats every 5 s) means the process may be gone."""
    return env_number("MEDAI_STALE_HEARTBEAT_S", 60.0)


@dataclass
class Job:
    run_id: str
    username: str
    run_dir: Path
    device: str
    state: str
    pid: int | None
    created_at: float
    registered_as: str | None = None
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        total = self.status.get("total_steps") or 0
        return min(1.0, (self.status.get("step") or 0) / total) if total else 0.0


def _job(row: dict[str, Any]) -> Job:
    run_dir = Path(row["run_dir"])
    return Job(row["run_id"], row["username"], run_dir, row["device"], row["state"], row["pid"],
               row["created_at"], row["registered_as"], runs.read_status(run_dir))


def device_of(cfg: ExperimentConfig) -> str:
    if cfg.train.device != "auto":
        return cfg.train.device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_launchable(cfg: ExperimentConfig) -> None:
    """Refuse, with a reason, what would fail in the job process anyway."""
    from medai.models.pretrained import weight_source
    from medai.models.registry import architectures
    from medai.precision import resolve_device, resolve_precision
    from medai.training.distributed import check_nproc

    if not RUN_NAME.match(cfg.name):
        raise ConfigError(f"run name {cfg.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if not resolve_data_path(cfg.data.root).exists():
        raise ConfigError(f"dataset {cfg.data.root!r} was not found under {resolve_data_path('.')}")
    if cfg.model.name not in architectures():
        raise ConfigError(f"unknown architecture {cfg.model.name!r}; available: {', '.join(architectures())}")
    named = weight_source(cfg.model.pretrained)
    if named is not None:
        named.path()  # a missing package is refused here, with what to install
    elif cfg.model.pretrained and not Path(cfg.model.pretrained).expanduser().is_file():
        raise ConfigError(f"starting checkpoint {cfg.model.pretrained} does not exist")
    resolve_precision(cfg.train.amp, resolve_device(cfg.train.device))  # e.g. fp16 on CPU is refused
    check_nproc(cfg.train.nproc_per_node, resolve_device(cfg.train.device))


def submit(cfg: ExperimentConfig, username: str, store: Store | None = None) -> Job:
    """Queue a new run (validated first) and start it if its device is free."""
    store = store or Store()
    check_launchable(cfg)
    run_dir = runs.new_run(cfg)
    store.add_run(run_dir.name, username, str(run_dir), device_of(cfg), QUEUED)
    store.audit(username, AuditAction.TRAINING_LAUNCH, run_id=run_dir.name, name=cfg.name, architecture=cfg.model.name,
                data=cfg.data.root, epochs=cfg.train.epochs)
    refresh(store)
    return get_job(run_dir.name, store)


def get_job(run_id: str, store: Store | None = None) -> Job:
    rows = [r for r in (store or Store()).runs() if r["run_id"] == run_id]
    if not rows:
        raise MedaiError(f"no training job {run_id!r}")
    return _job(rows[0])


def list_jobs(store: Store | None = None) -> list[Job]:
    """All registered jobs, newest first (after reconciling their states)."""
    store = store or Store()
    refresh(store)
    return [_job(r) for r in reversed(store.runs())]


def _mark_failed(store: Store, job: Job, message: str) -> None:
    status = {**job.status, "state": FAILED, "finished_at": time.time(), "message": message,
              "log_tail": log_tail(job.run_dir)}
    runs.write_status(job.run_dir, status)
    store.update_run(job.run_id, state=FAILED)


def refresh(store: Store | None = None) -> None:
    """Reconcile running jobs with their folders, detect dead processes, start queued jobs."""
    store = store or Store()
    for row in store.runs((RUNNING,)):
        job = _job(row)
        state = job.status.get("state")
        if state in FINAL_STATES:
            store.update_run(job.run_id, state=state)
            runs.process_alive(job.pid)  # reap
            continue
        beat = job.status.get("heartbeat") or row["updated_at"]
        stale = time.time() - beat > stale_after_s()
        if not runs.process_alive(job.pid) and (stale or state != RUNNING):
            _mark_failed(store, job, f"the training process (pid {job.pid}) ended without finishing")
        elif stale and time.time() - beat > 10 * stale_after_s():
            _mark_failed(store, job, f"no heartbeat for {time.time() - beat:.0f} s; the process looks hung")
    _start_queued(store)


def _start_queued(store: Store) -> None:
    busy: dict[str, int] = {}
    for row in store.runs((RUNNING,)):
        busy[row["device"]] = busy.get(row["device"], 0) + 1
    for row in store.runs((QUEUED,)):
        if busy.get(row["device"], 0) >= runs_per_device():
            continue
        _spawn(store, _job(row))
        busy[row["device"]] = busy.get(row["device"], 0) + 1


def _spawn(store: Store, job: Job) -> None:
    with open(job.run_dir / runs.PROCESS_LOG, "ab") as log:
        how = "--resume" if (job.run_dir / runs.RESUME_STATE).exists() else "--queued"
        proc = subprocess.Popen([sys.executable, "-m", "medai", "train", how, str(job.run_dir), "--no-progress"], cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    store.update_run(job.run_id, state=RUNNING, pid=proc.pid)


def cancel(run_id: str, username: str, store: Store | None = None) -> None:
    """Stop a job cleanly: a queued one never starts; a running one ends its step, keeps its last
    checkpoint and becomes ``cancelled``."""
    store = store or Store()
    job = get_job(run_id, store)
    if job.state == QUEUED or (job.state == RUNNING and job.status.get("state") != RUNNING):
        # never started, or its process has not started training yet (nothing to save): say so ourselves
        if job.state == RUNNING and runs.process_alive(job.pid):
            os.kill(job.pid, signal.SIGTERM)
        runs.write_status(job.run_dir, {**job.status, "state": CANCELLED, "message": "cancelled"})
        store.update_run(run_id, state=CANCELLED)
    elif job.state == RUNNING:
        runs.request_cancel(job.run_dir)  # the trainer ends its step, saves and reports "cancelled"
        if runs.process_alive(job.pid):
            os.kill(job.pid, signal.SIGTERM)
    else:
        raise MedaiError(f"{run_id} is {job.state}; only queued or running jobs can be cancelled")
    store.audit(username, AuditAction.TRAINING_CANCEL, run_id=run_id)


def resume(run_id: str, username: str, store: Store | None = None) -> None:
    """Queue a cancelled or failed job again; it continues from its last completed epoch."""
    store = store or Store()
    job = get_job(run_id, store)
    if job.state not in RESUMABLE_STATES:
        raise MedaiError(f"{run_id} is {job.state}; only cancelled or failed jobs can be resumed")
    runs.write_status(job.run_dir, {"state": QUEUED, "run_id": run_id, "queued_at": time.time(),
                                    "message": f"resume queued after {job.state}"})
    store.update_run(run_id, state=QUEUED, pid=None)
    store.audit(username, AuditAction.TRAINING_RESUME, run_id=run_id)
    refresh(store)


def register(run_id: str, name: str, username: str, store: Store | None = None) -> Path:
    """Copy a finished job's best checkpoint to ``$MEDAI_HOME/models/<name>.safetensors`` (Analyze and
    Metrics list it from there)."""
    from medai.auth import USERNAME_RE  # same rule: letters, digits and . _ @ -

    store = store or Store()
    job = get_job(run_id, store)
    if not runs.is_finished(job.run_dir):
        raise MedaiError(f"{run_id} has not finished; only finished runs can be registered")
    if not USERNAME_RE.match(name):
        raise MedaiError("model names are 2-64 characters: letters, digits and . _ @ -")
    target = medai_home() / "models" / f"{name}.safetensors"
    if target.exists():
        raise MedaiError(f"a model named {name!r} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(job.run_dir / runs.BEST_WEIGHTS, tmp)
    store.update_run(run_id, registered_as=name)
    store.audit(username, AuditAction.MODEL_REGISTERED, run_id=run_id, name=name)
    return target
