"""Concurrency across the system: dashboard sessions analysing at once on one cached model while a
training job runs, and admins backing up and restoring at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from medai import auth, backup
from medai.analysis import analyze_bytes
from medai.analysis import explain_image
from medai.inference import Predictor
from medai.store import Store
from tests.conftest import ROOT, need, tiny_config

PASSWORD = "correct horse battery"


def analyse(predictor: Predictor, name: str, data: bytes) -> dict:
    """What one dashboard session computes for an upload: prediction, then heatmaps for every finding with
    the anatomy breakdown (the Analyze page's work, without Streamlit)."""
    analysis = analyze_bytes(predictor, "pneumonia-hybrid", data, name)
    exp = explain_image(predictor, analysis.image, "all", "gradcam", analysis.prediction.probabilities)
    return {"probabilities": list(analysis.prediction.probabilities), "heatmaps": exp.heatmaps,
            "shares": exp.shares, "anatomy": exp.anatomy.applicable}


def run_alongside(threads: list[threading.Thread], process: subprocess.Popen) -> None:
    """Run the threads to their end while ``process`` runs; the process must then succeed too."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]


def test_sessions_analysing_at_once_on_one_cached_model_get_their_solo_results_while_training_runs(
        tmp_path: Path, medai_home: Path):
    files = [*sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[:2],
             *sorted(need("kermany-pneumonia/val/PNEUMONIA").glob("*.jpeg"))[:2],
             sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0], need("dicom/siim_cxr_pa_mono2.dcm")]
    uploads = [(f.name, f.read_bytes()) for f in files]
    predictor = Predictor(ROOT / "models" / "pneumonia-hybrid.safetensors")  # as st.cache_resource shares it
    alone = [analyse(predictor, name, data) for name, data in uploads]

    config = tiny_config(tmp_path, "pneumoniamnist/pneumoniamnist_balanced_28.npz", data={"max_samples": 512},
                         train={"epochs": 2})
    need("pneumoniamnist/pneumoniamnist_balanced_28.npz")
    training = subprocess.Popen([sys.executable, "-m", "medai", "train", "--config", str(config)], cwd=ROOT,
                                env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []

    def session(i: int) -> None:
        try:
            for round_ in range(2):  # each session analyses its own image twice, interleaved with the others
                results[i, round_] = analyse(predictor, *uploads[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    run_alongside([threading.Thread(target=session, args=(i,)) for i in range(len(uploads))], training)
    assert not errors, errors
    run = next((medai_home / "results" / "runs").iterdir())
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    for i, solo in enumerate(alone):
        for round_ in range(2):
            got = results[i, round_]
            assert got["probabilities"] == solo["probabilities"], uploads[i][0]
            assert got["heatmaps"].keys() == solo["heatmaps"].keys() and got["anatomy"] == solo["anatomy"]
            for label, heatmap in solo["heatmaps"].items():
                np.testing.assert_array_equal(got["heatmaps"][label], heatmap)
            assert got["shares"] == solo["shares"]
    assert all(not m._forward_hooks and not m._backward_hooks for m in predictor.model.modules())


def test_admins_backing_up_and_restoring_at_once_are_serialized(medai_home: Path):
    """Three admins in the dashboard (threads) and one on the CLI (a process) back up and restore at the
    same moment: the operations run one after another, each archive verifies, and the installation ends in
    one consistent state."""
    (medai_home / "models").mkdir()
    (medai_home / "models" / "m.safetensors").write_bytes(os.urandom(3_000_000))  # makes each backup take a while
    auth.create_user(Store(), "admin1", PASSWORD, "admin")
    first = backup.create("admin1", label="first")
    spans: dict[str, list[float]] = {}
    errors: list[BaseException] = []

    def timed(name: str, work) -> None:
        """Run ``work`` with a progress callback that records its first and last report (both inside the
        operation, so inside the lock when the lock works)."""
        def progress(_fraction: float, _message: str) -> None:
            now = time.monotonic()
            spans.setdefault(name, [now, now])[1] = now
        try:
            work(progress)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    jobs = {"a-create": lambda p: backup.create("alice", label="alice", progress=p),
            "b-restore": lambda p: backup.restore(first.name, "bob", progress=p),
            "c-create": lambda p: backup.create("carol", label="carol", progress=p)}
    threads = [threading.Thread(target=timed, args=item) for item in jobs.items()]
    cli = subprocess.Popen([sys.executable, "-m", "medai", "backup", "create", "--label", "cli"], cwd=ROOT,
                           env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_alongside(threads, cli)
    assert not errors, errors
    ordered = sorted(spans.values())
    for (_, end), (start, _) in zip(ordered, ordered[1:]):
        assert start >= end, f"two backup operations overlapped: {spans}"
    names = [i.name for i in backup.list_backups()]
    for label in ("first", "alice", "carol", "cli", "pre-restore"):
        assert any(n.endswith(f"-{label}.tar.gz") for n in names), (label, names)
    for info in backup.list_backups():
        backup.verify(info.path)
    assert not list(medai_home.glob(".restore-*")) and not list((medai_home / "backups").glob(".*.partial"))
    assert Store().get_user("admin1") is not None and (medai_home / "models" / "m.safetensors").is_file()
