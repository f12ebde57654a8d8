"""Training jobs as separate processes: queue, finish, register, cancel/resume, and death detection."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from medai.catalog import list_models
from medai.config import load_config
from medai.errors import ConfigError, MedaiError
from medai.store import Store
from medai import jobs
from medai.runs import read_progress
from tests.conftest import need, tiny_config


def mnist_job_config(tmp_path: Path, **train):
    need("pneumoniamnist")
    path = tiny_config(tmp_path, "pneumoniamnist", data={"labels": ["normal", "pneumonia"], "max_samples": 160},
                       train={"epochs": 2, **train})
    return load_config(path)


def wait_for(run_id: str, states: tuple[str, ...], timeout: float = 240) -> jobs.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs.refresh()
        job = jobs.get_job(run_id)
        if job.state in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"{run_id} did not reach {states}; it is {job.state}:\n{jobs.log_tail(job.run_dir)}")


def test_job_runs_in_its_own_process_finishes_and_registers(tmp_path: Path):
    job = jobs.submit(mnist_job_config(tmp_path), "res1")
    assert job.state == "running" and job.pid and job.pid != os.getpid()
    done = wait_for(job.run_id, ("finished", "failed"))
    assert done.state == "finished", jobs.log_tail(done.run_dir)
    assert done.status["best_val_auroc"] > 0.5
    path = jobs.register(job.run_id, "mnist-from-ui", "res1")
    assert "mnist-from-ui" in [e.name for e in list_models()[0]] and path.is_file()
    with pytest.raises(MedaiError, match="already exists"):
        jobs.register(job.run_id, "mnist-from-ui", "res1")
    actions = [e["action"] for e in Store().audit_log()]
    assert "training_launch" in actions and "model_registered" in actions


def test_one_job_per_device_at_a_time_and_queued_cancel(tmp_path: Path):
    first = jobs.submit(mnist_job_config(tmp_path), "res1")
    second = jobs.submit(mnist_job_config(tmp_path), "res1")
    assert first.state == "running" and second.state == "queued"
    jobs.cancel(second.run_id, "res1")
    assert jobs.get_job(second.run_id).state == "cancelled"
    wait_for(first.run_id, ("finished",))
    jobs.refresh()
    assert jobs.get_job(second.run_id).state == "cancelled"  # a cancelled job never starts


def test_cancel_then_resume_continues_from_the_last_epoch(tmp_path: Path):
    job = jobs.submit(mnist_job_config(tmp_path, epochs=4), "res1")
    progress = job.run_dir
    deadline = time.monotonic() + 180
    while not any(r["type"] == "epoch" for r in read_progress(progress)) and time.monotonic() < deadline:
        time.sleep(0.3)
    jobs.cancel(job.run_id, "res1")
    cancelled = wait_for(job.run_id, ("cancelled", "finished"))
    assert cancelled.state == "cancelled" and (job.run_dir / "last.pt").is_file()
    epochs_before = [r["epoch"] for r in read_progress(progress) if r["type"] == "epoch"]
    assert len(epochs_before) < 4
    jobs.resume(job.run_id, "res1")
    assert wait_for(job.run_id, ("finished", "failed")).state == "finished"
    assert [r["epoch"] for r in read_progress(progress) if r["type"] == "epoch"] == [0, 1, 2, 3]


def test_killed_process_is_marked_failed_with_its_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDAI_STALE_HEARTBEAT_S", "1")
    job = jobs.submit(mnist_job_config(tmp_path, epochs=6), "res1")
    deadline = time.monotonic() + 120
    while jobs.get_job(job.run_id).status.get("state") != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(job.pid, signal.SIGKILL)
    failed = wait_for(job.run_id, ("failed", "finished"), timeout=30)
    assert failed.state == "failed"
    status = json.loads((job.run_dir / "status.json").read_text())
    assert "ended without finishing" in status["message"] and "train.log" in status["log_tail"]
    jobs.resume(job.run_id, "res1")  # a failed job can be resumed
    assert jobs.get_job(job.run_id).state == "running"
    jobs.cancel(job.run_id, "res1")
    wait_for(job.run_id, ("cancelled", "finished"))


def test_bad_launches_are_refused_before_anything_starts(tmp_path: Path):
    cfg = mnist_job_config(tmp_path)
    cfg.data.root = "no-such-dataset"
    with pytest.raises(ConfigError, match="not found"):
        jobs.submit(cfg, "res1")
    cfg = mnist_job_config(tmp_path, amp="fp16", device="cpu")
    with pytest.raises(ConfigError):
        jobs.submit(cfg, "res1")
    assert Store().runs() == []
