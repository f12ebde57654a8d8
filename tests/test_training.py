"""The trainer on real data: it learns, resumes exactly after kill -9, and honours its switches."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medai.config import load_config
from medai.errors import ConfigError
from medai.models import create_model
from medai.models.checkpoint import read_card
from medai.precision import resolve_precision
from medai.runs import read_progress
from medai.training.callbacks import Callback
from medai.training.loop import EarlyStopping, make_loss
from medai.runs import CANCEL_FILE, new_run as new_run_dir
from medai.training.ema import WeightAverage
from medai.training.trainer import Trainer, resume, train
from tests.conftest import ROOT, need, run_cli, tiny_config

MNIST_LABELS = ["normal", "pneumonia"]


def mnist_config(tmp_path: Path, **train_overrides):
    need("pneumoniamnist")
    path = tiny_config(tmp_path, "pneumoniamnist", data={"labels": MNIST_LABELS, "max_samples": 160},
                       train={"epochs": 2, **train_overrides})
    return load_config(path)


def epochs_of(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_progress(run_dir) if r["type"] == "epoch"]


def test_real_learning_pneumoniamnist_reaches_auroc_090():
    """A short CPU run on real images must learn: a broken pipeline cannot pass this."""
    need("pneumoniamnist")
    cfg = load_config(ROOT / "configs/hybrid_pneumoniamnist.yaml", ["train.epochs=3", "train.bootstrap=100"])
    run_dir = train(cfg)
    report = json.loads((run_dir / "eval.json").read_text())["val"]
    assert report["macro"]["auroc"] >= 0.90, report["macro"]
    assert report["n"] == 270 and report["accuracy"] > 0.8
    lo, hi = report["per_class"]["pneumonia"]["auroc_ci95"]
    assert lo <= report["per_class"]["pneumonia"]["auroc"] <= hi
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["pid"] == os.getpid()
    card = read_card(run_dir / "best.safetensors")
    assert card["labels"] == MNIST_LABELS and card["task"]["kind"] == "multiclass"
    assert card["thresholds"]["pneumonia"] == report["per_class"]["pneumonia"]["threshold"]
    assert card["temperature"] == report["calibration"]["temperature"]
    assert card["data_summary"]["used"]["train"]["images"] == 2428
    progress = read_progress(run_dir)
    steps = [r for r in progress if r["type"] == "step"]
    assert steps and all(k in steps[-1] for k in ("loss", "lr", "images_per_s", "eta_s"))
    assert [r["epoch"] for r in progress if r["type"] == "epoch"] == [0, 1, 2]
    assert (run_dir / "predictions.csv").read_text().count("\n") == 271
    assert "run " in (run_dir / "train.log").read_text()


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path: Path):
    cfg = mnist_config(tmp_path, amp="bf16", channels_last=True, epochs=1)
    cfg.model.name, cfg.model.kwargs = "resnet18", {}
    prec = resolve_precision("bf16", torch.device("cpu"))
    with prec.autocast():
        assert create_model("resnet18", 2)(torch.randn(2, 1, 48, 48)).dtype == torch.bfloat16
    run_dir = train(cfg)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["precision"] == "bf16"
    losses = [r["loss"] for r in read_progress(run_dir) if r["type"] == "step"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ConfigError, match="fp16 autocast needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")).dtype is None


class Snapshots(Callback):
    def __init__(self, run_dir_holder: list):
        self.holder, self.states = run_dir_holder, []

    def on_epoch(self, record):
        self.states.append(torch.load(self.holder[0] / "last.pt", weights_only=True)["model"])


def test_two_stage_trains_the_head_first_then_everything(tmp_path: Path):
    cfg = mnist_config(tmp_path, head_epochs=1, finetune_lr_factor=0.1, early_stopping_patience=None)
    torch.manual_seed(cfg.train.seed)
    initial = create_model(cfg.model.name, 2, image_size=48, **cfg.model.kwargs).state_dict()
    run_dir = new_run_dir(cfg)
    snaps = Snapshots([run_dir])
    Trainer(cfg, run_dir, [snaps]).fit()
    stage1, stage2 = snaps.states
    stem = "stem.0.0.weight"
    head = "classifier.3.weight"
    assert torch.equal(stage1[stem], initial[stem]) and not torch.equal(stage1[head], initial[head])
    assert not torch.equal(stage2[stem], stage1[stem])
    lrs = {r["epoch"]: r["lr"] for r in read_progress(run_dir) if r["type"] == "step"}
    assert lrs[1] < 0.2 * cfg.train.lr


def test_weight_average_follows_the_live_weights_with_a_warm_up(tmp_path: Path):
    live = torch.nn.Linear(2, 1)
    ema = WeightAverage(live, decay=0.99)
    start = live.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live)  # first update: decay held down to 2/11, so the average moves 9/11 of the way
    assert torch.allclose(ema.module.weight, start + 9 / 11, atol=1e-6)
    for _ in range(2000):
        ema.update(live)
    assert ema.current_decay() == 0.99 and torch.allclose(ema.module.weight, live.weight, atol=1e-5)
    assert not ema.module.weight.requires_grad and not ema.module.training
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(live, 1.0)
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(tiny_config(tmp_path, "pneumoniamnist", train={"ema_decay": 1.5}))


def test_weight_average_ramp_sets_how_fast_the_window_is_reached(tmp_path: Path):
    """ramp 9 (TensorFlow's warm-up) is still below a decay of 0.998 after 4,000 updates; ramp 1 is the running
    mean of the start and every update until the window is reached (after 498), then the moving average."""
    slow = WeightAverage(torch.nn.Linear(2, 1), decay=0.998)
    slow.updates = 4000
    assert slow.current_decay() == pytest.approx(4001 / 4010) and slow.current_decay() < 0.998
    live = torch.nn.Linear(2, 1)
    mean = WeightAverage(live, decay=0.998, ramp=1.0)
    seen = [live.weight.detach().clone()]
    for k in range(1, 6):
        with torch.no_grad():
            live.weight.copy_(torch.full_like(live.weight, float(k ** 2)))
        seen.append(live.weight.detach().clone())
        mean.update(live)
        running_mean = (seen[0] + sum(seen)) / (k + 2)  # the start counts as two updates, as in TensorFlow's
        assert torch.allclose(mean.module.weight, running_mean, atol=1e-5)
    mean.updates = 498
    assert mean.current_decay() == pytest.approx(499 / 500)
    mean.updates = 10_000
    assert mean.current_decay() == 0.998
    with pytest.raises(ValueError, match="ramp must be > 0"):
        WeightAverage(live, 0.99, ramp=0)
    with pytest.raises(ConfigError, match="train.ema_ramp"):
        load_config(tiny_config(tmp_path, "pneumoniamnist", train={"ema_decay": 0.99, "ema_ramp": 0}))


class CancelAfterFirstEpoch(Callback):
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_epoch(self, record):
        if record["epoch"] == 0:
            (self.run_dir / CANCEL_FILE).touch()


def test_ema_run_keeps_and_resumes_the_weight_average(tmp_path: Path):
    """With train.ema_decay the average is what is validated and saved as best; last.pt carries it, and a
    run cancelled after its first epoch resumes the average where it stopped."""
    cfg = mnist_config(tmp_path, ema_decay=0.9, early_stopping_patience=None)
    run_dir = new_run_dir(cfg)
    Trainer(cfg, run_dir, [CancelAfterFirstEpoch(run_dir)]).fit()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "cancelled"
    after_first = torch.load(run_dir / "last.pt", weights_only=True)
    steps = after_first["loop"]["step"]
    assert after_first["ema"]["updates"] == steps > 0
    best = load_file(str(run_dir / "best.safetensors"))
    averaged, live = after_first["ema"]["module"], after_first["model"]
    assert all(torch.equal(best[k], averaged[k]) for k in best)
    assert any(not torch.equal(averaged[k], live[k]) for k in live if live[k].is_floating_point())
    resume(run_dir)
    final = torch.load(run_dir / "last.pt", weights_only=True)
    assert final["ema"]["updates"] == final["loop"]["step"] == 2 * steps
    epochs = [r for r in read_progress(run_dir) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(0 <= r["val_auroc"] <= 1 and 0 <= r["val_auroc_live"] <= 1 for r in epochs)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_label_smoothing_reaches_multilabel_losses(tmp_path: Path):
    """Multi-label targets move label_smoothing / 2 towards 0.5, with the class weights kept; a multi-class
    loss smooths as cross-entropy does. Before, a multi-label run ignored the setting."""
    targets = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=np.float32)
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0], [0.2, 1.5, -2.0], [-1.0, -1.0, -1.0]])
    y = torch.from_numpy(targets)
    for weighting in (False, True):
        cfg = load_config(tiny_config(tmp_path, "pneumoniamnist", train={"label_smoothing": 0.2,
                                                                          "class_weighting": weighting}))
        smoothed = make_loss("multilabel", targets, cfg.train, torch.device("cpu"))(logits, y)
        pos_weight = torch.tensor([3.0, 3.0, 3.0]) if weighting else None  # (4 - 1) / 1 per finding
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, y * 0.8 + 0.1, pos_weight=pos_weight)
        plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        assert torch.isclose(smoothed, expected) and not torch.isclose(smoothed, plain)
    multiclass = make_loss("multiclass", targets[:3], cfg.train, torch.device("cpu"))(logits[:3], y[:3])
    expected = torch.nn.functional.cross_entropy(logits[:3], y[:3].argmax(1), label_smoothing=0.2)
    assert torch.isclose(multiclass, expected)  # one film per class: the class weights are all 1
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        load_config(tiny_config(tmp_path, "pneumoniamnist", train={"label_smoothing": 1.0}))


def test_early_stopping_rule():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    verdicts = [(stopper.update(s, e), stopper.should_stop) for e, s in enumerate([0.7, 0.8, 0.805, None, 0.9])]
    assert verdicts == [(True, False), (True, False), (False, False), (False, True), (True, False)]
    assert stopper.best == 0.9 and stopper.best_epoch == 4
    assert not EarlyStopping(None).should_stop


def test_run_stops_at_the_first_epoch_that_exhausts_patience(tmp_path: Path):
    cfg = mnist_config(tmp_path, epochs=6, early_stopping_patience=1, early_stopping_min_delta=0.002, lr=3e-3)
    run_dir = train(cfg)
    epochs = [r for r in read_progress(run_dir) if r["type"] == "epoch"]
    first_bad = next((r["epoch"] for r in epochs if not r["improved"]), None)
    assert epochs[-1]["epoch"] == (5 if first_bad is None else first_bad)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["epochs_done"] == len(epochs)
    assert status["best_val_auroc"] == [r["val_auroc"] for r in epochs if r["improved"]][-1]


def test_cancel_then_resume(tmp_path: Path):
    cfg = mnist_config(tmp_path)
    run_dir = new_run_dir(cfg)
    (run_dir / CANCEL_FILE).touch()
    Trainer(cfg, run_dir).fit()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "cancelled"
    assert epochs_of(run_dir) == [] and not (run_dir / "eval.json").exists()
    resume(run_dir)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert epochs_of(run_dir) == [0, 1] and (run_dir / "eval.json").is_file()


def test_a_finished_run_gives_sigterm_back_and_keeps_nothing_alive(tmp_path: Path):
    """SIGTERM cancels the run while it trains; afterwards the caller's handler is back, and nothing still
    holds the trainer (a handler left bound to it kept a DDP wrapper and its gloo group alive until
    interpreter exit, where tearing the group down aborted a finished torchrun rank)."""
    cfg = mnist_config(tmp_path, epochs=1)

    def mine(*_):
        return None

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        trainer = Trainer(cfg, new_run_dir(cfg))
        alive = weakref.ref(trainer)
        trainer.fit()
        assert signal.getsignal(signal.SIGTERM) is mine
        del trainer
        gc.collect()
        assert alive() is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path, medai_home: Path):
    need("pneumoniamnist")
    config = tiny_config(tmp_path, "pneumoniamnist",
                         data={"labels": MNIST_LABELS, "max_samples": 480},
                         augment={"enabled": True}, train={"epochs": 3, "batch_size": 16})
    reference = run_cli("train", "--config", str(config), "--no-progress", check=True)
    runs = medai_home / "results" / "runs"
    ref_dir = next(runs.iterdir())
    assert "finished" in reference.stdout

    proc = subprocess.Popen([sys.executable, "-m", "medai", "train", "--config", str(config), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_mid_epoch = False
    while time.time() < deadline and proc.poll() is None:
        runs_now = [d for d in runs.iterdir() if d != ref_dir]
        if runs_now:
            records = read_progress(runs_now[0])
            if any(r["type"] == "step" and r["epoch"] == 1 for r in records):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_mid_epoch = 1 not in [r["epoch"] for r in records if r["type"] == "epoch"]
                break
        time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed_mid_epoch
    run_dir = next(d for d in runs.iterdir() if d != ref_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running"  # what the process left: a stale heartbeat tells the UI

    resumed = run_cli("train", "--resume", run_dir.name, "--no-progress", check=True)
    assert "finished" in resumed.stdout
    assert epochs_of(run_dir) == [0, 1, 2]
    steps = [r["step"] for r in read_progress(run_dir) if r["type"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 3 * 30
    a, b = load_file(str(ref_dir / "best.safetensors")), load_file(str(run_dir / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_whole_process_group_cancels_the_run_and_it_resumes(tmp_path: Path, medai_home: Path):
    """Was: a stop sent to the process group (timeout, a service manager, pkill -f) also reached the
    DataLoader workers, one died mid-batch and the run ended 'failed' instead of 'cancelled'."""
    need("pneumoniamnist")
    config = tiny_config(tmp_path, "pneumoniamnist", data={"labels": MNIST_LABELS, "max_samples": 480},
                         train={"epochs": 2, "batch_size": 16, "num_workers": 2})
    proc = subprocess.Popen([sys.executable, "-m", "medai", "train", "--config", str(config), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = medai_home / "results" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(runs.iterdir()) if runs.is_dir() else []
        if found and any(r["type"] == "step" for r in read_progress(found[0])):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its loader workers alike
    assert proc.wait(timeout=120) == 3  # the CLI's code for a run that did not finish
    (run_dir,) = runs.iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled" and "SIGTERM" in status["message"], status
    assert "finished" in run_cli("train", "--resume", run_dir.name, "--no-progress", check=True).stdout
    assert epochs_of(run_dir) == [0, 1]


def test_multilabel_nih_run_with_external_evaluation(tmp_path: Path):
    """BCE with pos_weight over the 14 findings, validated by patient split, then evaluated on the
    621-image NIH sample of other patients."""
    need("nih-cxr14-train-224")
    need("nih-cxr14-sample")
    path = tiny_config(tmp_path, "nih-cxr14-train-224",
                       data={"max_samples": 128, "eval_root": "nih-cxr14-sample"},
                       train={"epochs": 1, "batch_size": 32})
    run_dir = train(load_config(path))
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["val"]["kind"] == "multilabel" and report["val"]["n"] == 128
    external = report["external"]
    assert external["n"] == 621 and len(external["per_class"]) == 14
    assert external["calibration"]["temperature"] == report["val"]["calibration"]["temperature"]
    assert all(external["per_class"][lab]["threshold"] == report["val"]["per_class"][lab]["threshold"]
               for lab in external["per_class"])
    assert all(v["auroc"] is not None for v in external["per_class"].values())  # every finding occurs there
    card = read_card(run_dir / "best.safetensors")
    assert card["data_summary"]["patient_disjoint"] and card["task"]["kind"] == "multilabel"
    header = (run_dir / "predictions_external.csv").read_text().splitlines()[0]
    assert header.startswith("id,patient_id,true_Atelectasis")
