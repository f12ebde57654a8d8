"""Data-parallel training under torchrun (2 gloo processes on CPU) on real NIH ChestX-ray14 images."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medai.config import load_config
from medai.data.transforms import PreprocessSpec
from medai.errors import ConfigError
from medai.evaluation.calibration import probs_from_logits
from medai.evaluation.metrics import quick_scores
from medai.models.checkpoint import load_checkpoint, read_card
from medai.training import distributed
from medai.precision import resolve_precision
from medai.runs import read_progress
from medai.evaluation.predict import predict_loader
from medai.runs import CANCEL_FILE
from medai.training.trainer import Trainer
from tests.conftest import ROOT, need, run_cli, tiny_config

N_IMAGES = 97  # odd: one image per epoch falls off so that the two shards stay disjoint and equal


def nih_config(tmp_path: Path, **train) -> Path:
    need("nih-cxr14-train-224")
    return tiny_config(tmp_path, "nih-cxr14-train-224", data={"max_samples": N_IMAGES},
                       train={"epochs": 2, "batch_size": 8, "lr": 2e-3, "bootstrap": 20, **train})


def epochs(run_dir: Path) -> list[dict]:
    return [r for r in read_progress(run_dir) if r["type"] == "epoch"]


def run_of(stdout: str) -> Path:
    line = [ln for ln in stdout.splitlines() if ln.startswith("run ")][-1]
    return Path(line.rsplit("-> ", 1)[1])


def single_process_val_auroc(run_dir: Path) -> float:
    """The best checkpoint's val AUROC computed the ordinary way: one process, the whole val split."""
    trainer = Trainer(load_config(run_dir / "config.yaml"), run_dir)
    cfg = trainer.cfg
    trainer.prec = resolve_precision("off", torch.device("cpu"))
    trainer.spec = PreprocessSpec(cfg.preprocess.image_size, cfg.preprocess.mean, cfg.preprocess.std)
    recset, _train, val = trainer._data()
    best = load_checkpoint(run_dir / "best.safetensors")
    preds = predict_loader(best.model, trainer._loader(val, False), trainer.prec)
    return quick_scores(preds["targets"], probs_from_logits(preds["logits"], recset.kind))["auroc"]


@pytest.mark.timeout(300)
def test_two_gloo_processes_train_on_disjoint_shards_and_agree_with_one_process(tmp_path, medai_home):
    # two-stage fine-tuning: the DDP wrapper is rebuilt when the trainable parameters change
    proc = run_cli("train", "--config", str(nih_config(tmp_path, head_epochs=1)), "--nproc-per-node", "2",
                   "--no-progress", timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--standalone --nproc-per-node=2 -m medai train" in proc.stdout  # the command it ran
    run_dir = run_of(proc.stdout)
    records = epochs(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["world_size"] == 2
        assert r["shards_overlap"] == 0
        assert [s["images"] for s in r["shards"]] == [N_IMAGES // 2] * 2
        assert r["shards"][0]["order"] != r["shards"][1]["order"]
    # reshuffled per epoch: each rank's sequence differs between epochs
    assert {s["order"] for s in records[0]["shards"]}.isdisjoint(s["order"] for s in records[1]["shards"])
    assert records[1]["step"] == 2 * -(-(N_IMAGES // 2) // 8)  # per-process batch 8 over half the images

    # the checkpoints hold exactly the weights rank 0 reported (and that all ranks agreed on)
    last = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert distributed.weights_digest(last) == records[-1]["weights_digest"]
    best_epoch = max(r["epoch"] for r in records if r["improved"])
    best = load_file(str(run_dir / "best.safetensors"))
    assert distributed.weights_digest(best) == records[best_epoch]["weights_digest"]

    # the AUROC from the gathered predictions is the single-process AUROC of the same weights
    assert single_process_val_auroc(run_dir) == pytest.approx(records[best_epoch]["val_auroc"], abs=1e-6)

    card = read_card(run_dir / "best.safetensors")
    assert card["distributed"] == {"world_size": 2, "backend": "gloo", "per_process_batch": 8,
                                   "effective_batch": 16, "lr_scaling": "none", "base_lr": 2e-3,
                                   "effective_lr": 2e-3, "sync_batchnorm": False}
    assert (run_dir / "eval.json").is_file() and json.loads((run_dir / "status.json").read_text())["state"] == \
        "finished"
    assert not list(run_dir.glob("*.tmp*"))


@pytest.mark.slow  # ~80 s; `make test` keeps the one-process cancel/resume (tests/test_jobs.py) and 2-process training
@pytest.mark.timeout(400)
def test_a_distributed_run_cancels_on_every_rank_and_resumes_on_two_processes(tmp_path, medai_home):
    # AMP (bf16 autocast on CPU) and channels-last run the same under DDP; SyncBatchNorm is CUDA-only
    config = nih_config(tmp_path, epochs=60, lr_scaling="linear", amp="bf16", channels_last=True,
                        sync_batchnorm=True)
    proc = subprocess.Popen([sys.executable, "-m", "medai", "train", "--config", str(config), "--nproc-per-node",
                             "2", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    runs = medai_home / "results" / "runs"
    deadline = time.time() + 200
    while time.time() < deadline and not (list(runs.glob("*")) and epochs(next(runs.glob("*")))):
        time.sleep(0.5)
    run_dir = next(runs.glob("*"))
    assert epochs(run_dir), "no epoch finished in time"
    (run_dir / CANCEL_FILE).touch()
    out, _ = proc.communicate(timeout=150)  # both ranks stop: torchrun returns
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "cancelled", out[-2000:]
    assert status["precision"] == "bf16" and status["world_size"] == 2
    assert "sync_batchnorm needs CUDA" in (run_dir / "train.log").read_text()
    done = len(epochs(run_dir))
    assert 1 <= done < 60

    # resume the cancelled run for one more epoch: it relaunches itself under torchrun from its config
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["train"]["epochs"] = done + 1
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    resumed = run_cli("train", "--resume", str(run_dir), "--no-progress", timeout=200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--nproc-per-node=2" in resumed.stdout
    records = epochs(run_dir)
    assert [r["epoch"] for r in records] == list(range(done + 1))
    assert records[-1]["world_size"] == 2 and records[-1]["shards_overlap"] == 0
    card = read_card(run_dir / "best.safetensors")["distributed"]
    assert card["effective_lr"] == pytest.approx(2 * card["base_lr"])  # linear rule: x2 for 2 processes
    assert card["sync_batchnorm"] is False and card["backend"] == "gloo"
    # a resume cannot silently change the process count
    again = run_cli("train", "--resume", str(run_dir), "--nproc-per-node", "1")
    assert again.returncode == 2 and "same number" in again.stderr


def test_the_cli_prints_the_exact_torchrun_command(tmp_path):
    config = nih_config(tmp_path)
    proc = run_cli("train", "--config", str(config), "--nproc-per-node", "2", "--set", "train.epochs=3",
                   "--print-command", check=True)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.endswith(f"--standalone --nproc-per-node=2 -m medai train --config {config} --set "
                         "train.epochs=3 --set train.nproc_per_node=2")
    assert Path(line.split()[0]).name in ("torchrun", sys.executable.rsplit("/", 1)[-1])
    too_many = run_cli("train", "--config", str(config), "--nproc-per-node", "999", "--print-command")
    assert too_many.returncode == 2 and "cores would only contend" in too_many.stderr


@pytest.mark.parametrize("medai_args", [["train", "--queued", "results/runs/r1", "--no-progress"],
                                        ["train", "--resume", "results/runs/r1"],
                                        ["train", "--config", "c.yaml", "--set", "train.epochs=3"]])
def test_torchrun_hands_every_forwarded_train_command_to_medai_unchanged(medai_args):
    """torchrun's own parser sees the forwarded flags too: one that abbreviates a torchrun option
    (``--start`` for ``--start-method``, ``--run`` for ``--run-path``) is refused as ambiguous."""
    from torch.distributed.run import get_args_parser

    command = distributed.torchrun_command(2, medai_args)
    parsed = get_args_parser().parse_args(command[command.index("--standalone"):])
    assert parsed.module and parsed.training_script == "medai" and parsed.training_script_args == medai_args


def test_sharding_helpers():
    items = list(range(11))
    parts = [items[r::3] for r in range(3)]
    assert distributed.interleave(parts) == items
    assert distributed.lr_scale("linear", 8) == 8 and distributed.lr_scale("sqrt", 4) == 2
    assert distributed.lr_scale("none", 8) == 1
    m = torch.nn.Linear(3, 2)
    d = distributed.weights_digest(m)
    assert d == distributed.weights_digest({k: v.clone() for k, v in m.state_dict().items()})
    with torch.no_grad():
        m.bias[0] += 1e-6
    assert distributed.weights_digest(m) != d
    with pytest.raises(ConfigError, match="nproc_per_node"):
        distributed.check_nproc(0, torch.device("cpu"))
    assert distributed.init(torch.device("cpu")) is distributed.SINGLE  # not under torchrun: no group
