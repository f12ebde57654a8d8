"""Shipping a run: fp16 checkpoint with a full card, rendered Markdown, numbers `evaluate` reproduces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medai.config import load_config
from medai.models.checkpoint import load_checkpoint, read_card, save_checkpoint
from medai.shipping import ship_run
from medai.training.trainer import train
from tests.conftest import ROOT, need, run_cli, tiny_config


def shipped_copy(tmp_path: Path, name: str, as_name: str) -> Path:
    """A scratch copy of the shipped model ``models/<name>.safetensors`` that a card command may rewrite."""
    copy = tmp_path / as_name
    shutil.copy(ROOT / "models" / f"{name}.safetensors", copy)
    return copy


def assert_same_weights(before: dict[str, torch.Tensor], path: Path) -> None:
    after = load_file(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_ship_mnist_run_card_and_evaluate_reproduces(tmp_path: Path):
    need("pneumoniamnist")
    config = tiny_config(tmp_path, "pneumoniamnist", data={"labels": ["normal", "pneumonia"], "max_samples": 200},
                         train={"epochs": 2})
    run_dir = train(load_config(config))
    out = ship_run(run_dir, "mnist-demo", out_dir=tmp_path / "models", threshold_method="sensitivity",
                   target_sensitivity=0.97, notes="a smoke test")
    card = read_card(out)
    val = card["metrics"]["val"]
    assert val["per_class"]["pneumonia"]["sensitivity"] >= 0.97  # the requested operating point
    assert card["thresholds"]["pneumonia"] == val["per_class"]["pneumonia"]["threshold"]
    assert card["model_card"]["training"]["epochs_run"] == 2 and card["model_card"]["notes"] == "a smoke test"
    assert val["per_class"]["pneumonia"]["auroc_ci95"] is not None
    # fp16 weights: about half the fp32 file
    assert out.stat().st_size < 0.6 * (run_dir / "best.safetensors").stat().st_size
    md = out.with_suffix(".md").read_text()
    for heading in ("## Training data", "## Validation", "## Intended use", "## Known limitations"):
        assert heading in md
    assert "patient-disjoint: True" in md and "not for diagnosis" in md
    proc = run_cli("evaluate", "--checkpoint", str(out), "--data", str(run_dir / "config.yaml"), "--split", "val",
                   "--out", str(tmp_path / "eval"), check=True)
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert again["macro"] == val["macro"] and again["calibration"]["ece_after"] == val["calibration"]["ece_after"]
    assert again["per_class"]["pneumonia"]["auroc_ci95"] == val["per_class"]["pneumonia"]["auroc_ci95"]
    assert "macro" in proc.stdout
    # a baseline reported in the shipped card: its numbers and schedule, the weights untouched
    base = ship_run(run_dir, "mnist-base", out_dir=tmp_path / "scratch", n_boot=50)
    weights = load_file(str(out))
    run_cli("attach-baseline", str(out), str(base), check=True)
    summary = read_card(out)["model_card"]["baseline"]
    assert summary["macro"] == read_card(base)["metrics"]["val"]["macro"]
    assert all(torch.equal(t, load_file(str(out))[k]) for k, t in weights.items())
    assert "## Baseline\n`mnist-base`" in out.with_suffix(".md").read_text()
    assert "same data and schedule" in out.with_suffix(".md").read_text()
    assert "weights not shipped" in out.with_suffix(".md").read_text() and not summary["shipped"]
    loaded = load_checkpoint(base)
    other = {**loaded.card, "training_config": {**loaded.card["training_config"], "data": {"root": "elsewhere"}}}
    save_checkpoint(loaded.model, other, base, dtype=torch.float16)
    refused = run_cli("attach-baseline", str(out), str(base))
    assert refused.returncode != 0 and "not comparable" in refused.stderr


def test_a_run_that_keeps_every_epoch_ships_the_one_asked_for(tmp_path: Path):
    need("pneumoniamnist")
    config = tiny_config(tmp_path, "pneumoniamnist", data={"labels": ["normal", "pneumonia"], "max_samples": 200},
                         train={"epochs": 2, "keep_epochs": True, "bootstrap": 0})
    run_dir = train(load_config(config))
    kept = sorted(p.name for p in (run_dir / "epochs").iterdir())
    assert kept == ["epoch-001.safetensors", "epoch-002.safetensors"]
    best = json.loads((run_dir / "status.json").read_text())["best_epoch"] + 1  # the records count from 0
    other = 3 - best
    best_weights = load_file(run_dir / "best.safetensors")
    other_weights = load_file(run_dir / "epochs" / kept[other - 1])
    assert read_card(run_dir / "epochs" / kept[other - 1])["epoch"] == other
    assert all(torch.equal(t, load_file(run_dir / "epochs" / kept[best - 1])[k]) for k, t in best_weights.items())
    run_cli("ship", str(run_dir), "--name", "later", "--out", str(tmp_path / "models"), "--epoch", str(other),
            check=True)
    shipped = tmp_path / "models" / "later.safetensors"
    assert all(torch.equal(t.half() if t.is_floating_point() else t, load_file(shipped)[k])
               for k, t in other_weights.items())
    assert not all(torch.equal(t, other_weights[k]) for k, t in best_weights.items())
    card = read_card(shipped)
    assert card["model_card"]["training"]["shipped_epoch"] == other and "epoch" not in card
    assert card["thresholds"]["pneumonia"] == card["metrics"]["val"]["per_class"]["pneumonia"]["threshold"]
    assert (f"shipped epoch {other} (the best by validation AUROC was epoch {best})"
            in shipped.with_suffix(".md").read_text())
    refused = run_cli("ship", str(run_dir), "--name", "x", "--out", str(tmp_path / "models"), "--epoch", "5")
    assert refused.returncode != 0 and "kept no weights for epoch 5: it kept epochs 1, 2" in refused.stderr
    shutil.rmtree(run_dir / "epochs")  # as a run trained without train.keep_epochs
    refused = run_cli("ship", str(run_dir), "--name", "x", "--out", str(tmp_path / "models"), "--epoch", "1")
    assert refused.returncode != 0 and "train.keep_epochs: true" in refused.stderr


def test_ship_nih_run_reports_the_chexnet_reference(tmp_path: Path):
    need("nih-cxr14-train-224")
    need("nih-cxr14-sample/reference_chexnet_preds.csv")
    config = tiny_config(tmp_path, "nih-cxr14-train-224", data={"max_samples": 96, "eval_root": "nih-cxr14-sample"},
                         train={"epochs": 1, "batch_size": 32})
    out = ship_run(train(load_config(config)), "nih-demo", out_dir=tmp_path / "models", n_boot=50)
    metrics = read_card(out)["metrics"]
    reference = metrics["external_reference"]
    assert abs(reference["macro_auroc"] - 0.777) < 0.005  # the published figure for these 621 images
    assert set(reference["per_class_auroc"]) == set(metrics["external"]["per_class"])
    assert metrics["external"]["n"] == 621
    assert "reference AUROC" in out.with_suffix(".md").read_text()
    # the model's paired difference from the reference: the difference of the two AUROCs on the same films
    paired = reference["model_minus_reference"]
    for lab, d in paired["per_class"].items():
        ours, theirs = metrics["external"]["per_class"][lab]["auroc"], reference["per_class_auroc"][lab]
        assert d["diff"] == pytest.approx(ours - theirs) and d["ci95"][0] < d["diff"] < d["ci95"][1]
    assert paired["macro"]["diff"] == pytest.approx(metrics["external"]["macro"]["auroc"] - reference["macro_auroc"])
    assert paired["macro"]["diff"] < 0 and paired["macro"]["p"] < 0.001  # one epoch on 96 films is far behind
    assert f"{paired['macro']['diff']:+.3f}" in out.with_suffix(".md").read_text()


def test_models_registered_in_the_project_folder_do_not_dirty_the_source_tree():
    """Was: 'Register as model' with the default MEDAI_HOME left an untracked file in models/."""
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "models/my-registered-model.safetensors"], cwd=ROOT)
    assert ignored.returncode == 0
    shipped = subprocess.run(["git", "ls-files", "models"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "models/pneumonia-hybrid.safetensors" in shipped.split()  # the shipped ones stay tracked


def test_set_cam_stride_rewrites_the_card_only(tmp_path: Path):
    """``medai set-cam-stride``: the card's model kwargs and notes change, the weights and the predictions
    do not, the Markdown is re-rendered; an architecture without the setting is refused, its file untouched."""
    from medai.shipping import render_card

    copy = shipped_copy(tmp_path, "nih14-efficientnet-lite0", "nih14.safetensors")
    before = load_file(copy)
    run_cli("set-cam-stride", str(copy), "32", "--note", "Measured: the head.", check=True)
    card = read_card(copy)
    assert card["model_kwargs"]["cam_stride"] == 32 and card["model_card"]["notes"].endswith("Measured: the head.")
    assert load_checkpoint(copy).model.cam_method == "gradcam++" and "cam_smooth" not in card["model_kwargs"]
    run_cli("set-cam-stride", str(copy), "16", "--smooth", "0.5", check=True)
    assert read_card(copy)["model_kwargs"] == {"frozen_blocks": 6, "cam_stride": 16, "cam_smooth": 0.5}
    assert load_checkpoint(copy).model.cam_smooth == 0.5
    run_cli("set-cam-stride", str(copy), "32", "--note", "Measured: the head.", check=True)
    card = read_card(copy)
    assert_same_weights(before, copy)
    md = copy.with_suffix(".md").read_text()
    size = round(copy.stat().st_size / 2**20, 1)
    assert md == render_card({**card, "model_card": {**card["model_card"], "file_mb": size}})
    other = shipped_copy(tmp_path, "pneumonia-hybrid", "hybrid.safetensors")
    untouched = other.read_bytes()
    result = run_cli("set-cam-stride", str(other), "16")
    assert result.returncode != 0 and "are invalid" in result.stderr and "cam_stride" in result.stderr
    assert other.read_bytes() == untouched


def test_set_cam_method_makes_another_heatmap_the_default(tmp_path: Path):
    """``medai set-cam-method``: the stored config's ``model.cam_method`` names the default heatmap that
    Analyze, the API and PACS draw; the weights stay as they were; a method the project does not have, or
    one the model's attention loss did not train, is refused and leaves the file untouched."""
    from medai.analysis import default_method
    from medai.inference import Predictor

    copy = shipped_copy(tmp_path, "pneumonia-hybrid", "hybrid.safetensors")
    before = load_file(copy)
    assert default_method(Predictor(copy)) == "gradcam"  # the hybrid architecture's own default
    run_cli("set-cam-method", str(copy), "hirescam", "--note", "Measured: HiResCAM.", check=True)
    card = read_card(copy)
    assert card["training_config"]["model"]["cam_method"] == "hirescam"
    assert card["model_card"]["notes"].endswith("Measured: HiResCAM.")
    assert default_method(Predictor(copy)) == "hirescam"
    assert_same_weights(before, copy)
    for shipped, method, message in ((copy, "blurcam", "must be one of"),
                                     (ROOT / "models" / "pneumonia-hybrid-chest.safetensors", "layercam",
                                      "with train.attention_loss")):
        target = tmp_path / f"other-{shipped.name}"
        shutil.copy(shipped, target)
        untouched = target.read_bytes()
        result = run_cli("set-cam-method", str(target), method)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert target.read_bytes() == untouched


def test_note_adds_a_measurement_to_the_card_only(tmp_path: Path):
    """``medai note``: what was measured after shipping goes into the card's notes and its rendered card;
    the weights and settings stay; an empty note is refused and leaves the file untouched."""
    copy = shipped_copy(tmp_path, "pneumonia-hybrid", "hybrid.safetensors")
    before, card_before = load_file(copy), read_card(copy)
    run_cli("note", str(copy), "Where it looks: 35% on the chest.", check=True)
    card = read_card(copy)
    assert card["model_card"]["notes"] == card_before["model_card"]["notes"] + " Where it looks: 35% on the chest."
    assert {k: v for k, v in card.items() if k != "model_card"} == \
        {k: v for k, v in card_before.items() if k != "model_card"}
    assert "Where it looks: 35% on the chest." in copy.with_suffix(".md").read_text()
    assert_same_weights(before, copy)
    untouched = copy.read_bytes()
    result = run_cli("note", str(copy), "  ")
    assert result.returncode != 0 and "the note is empty" in result.stderr
    assert copy.read_bytes() == untouched
