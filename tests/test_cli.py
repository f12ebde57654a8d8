"""The command line end to end on real images: train -> evaluate (reproduces the run) -> predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medai.inference import Predictor
from tests.conftest import need, run_cli, tiny_config

KERMANY_PATIENT = r"^((?:NORMAL2-)?IM-\d+|person\d+)"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("kermany-pneumonia")
    tmp = tmp_path_factory.mktemp("cli")
    config = tiny_config(tmp, "kermany-pneumonia",
                         data={"max_samples": 96, "patient_regex": KERMANY_PATIENT},
                         train={"epochs": 2, "batch_size": 32, "bootstrap": 100})
    proc = run_cli("train", "--config", str(config), "--no-progress", check=True,
                   env={"MEDAI_HOME": str(tmp / "home")})
    run_dir = next((tmp / "home" / "results" / "runs").iterdir())
    assert "finished" in proc.stdout and str(run_dir) in proc.stdout
    return run_dir


def test_evaluate_reproduces_the_runs_validation_numbers(trained_run: Path, tmp_path: Path):
    stored = json.loads((trained_run / "eval.json").read_text())["val"]
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--checkpoint", str(trained_run / "best.safetensors"),
                   "--data", str(trained_run / "config.yaml"), "--out", str(out), "--bootstrap", "100",
                   check=True)
    again = json.loads((out / "eval.json").read_text())
    assert again["n"] == stored["n"] == 96
    for lab in ("NORMAL", "PNEUMONIA"):
        for key in ("auroc", "ap", "sensitivity", "specificity", "threshold"):
            assert again["per_class"][lab][key] == pytest.approx(stored["per_class"][lab][key], abs=1e-6)
    assert "PNEUMONIA" in proc.stdout and "macro" in proc.stdout
    assert (out / "predictions.csv").read_text().count("\n") == 97


def test_predict_json_matches_the_predictor(trained_run: Path):
    images = [sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[0],
              sorted(need("kermany-pneumonia/val/PNEUMONIA").glob("*.jpeg"))[0],
              need("dicom/siim_cxr_pa_mono2.dcm")]
    ckpt = trained_run / "best.safetensors"
    proc = run_cli("predict", "--checkpoint", str(ckpt), *map(str, images), "--json", check=True)
    results = json.loads(proc.stdout)
    predictor = Predictor(ckpt)
    for image, result in zip(images, results):
        probs = result["probabilities"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        expected = predictor.predict(image).probabilities
        assert np.allclose(list(probs.values()), expected, atol=1e-6)
        assert set(result["findings"]) <= {"NORMAL", "PNEUMONIA"}
    assert results[2]["file"].endswith(".dcm") and results[2]["image"]["source_format"] == "dicom"
    assert results[2]["image"]["photometric"] == "MONOCHROME2"
    plain = run_cli("predict", "--checkpoint", str(ckpt), str(images[0]), check=True)
    assert "threshold" in plain.stdout


def test_models_lists_architectures_and_checkpoints(trained_run: Path, medai_home: Path):
    (medai_home / "models").mkdir()
    shutil.copy(trained_run / "best.safetensors", medai_home / "models" / "pneumo-test.safetensors")
    proc = run_cli("models", check=True)
    assert "hybrid_cnn_transformer" in proc.stdout and "densenet121" in proc.stdout
    assert "pneumo-test.safetensors" in proc.stdout and "multiclass" in proc.stdout


def test_data_inspect_prints_counts():
    need("kermany-pneumonia")
    proc = run_cli("data", "inspect", "kermany-pneumonia", "--patient-regex", KERMANY_PATIENT, check=True)
    assert "3527" in proc.stdout and "595" in proc.stdout and "patients" in proc.stdout
    as_json = json.loads(run_cli("data", "inspect", "brain-tumor-mri", "--json", check=True).stdout)
    assert as_json["labels"] == ["glioma", "meningioma", "notumor", "pituitary"]


def test_bad_config_is_one_clear_line(tmp_path: Path):
    config = tiny_config(tmp_path, "kermany-pneumonia", train={"epochz": 2})
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2 and "train.epochz" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--config", str(config), "--set", "train.lr=fast")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    missing = run_cli("evaluate", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", "kermany-pneumonia")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_tokens_create_list_revoke(medai_home: Path):
    run_cli("users", "add", "pacs", "--role", "radiologist", "--password-stdin", input="correct horse battery\n",
            check=True)
    created = run_cli("tokens", "create", "pacs", "--label", "PACS bridge", check=True)
    token = created.stdout.strip()
    assert token.startswith("medai_") and "not shown again" in created.stderr
    listing = run_cli("tokens", "list", check=True).stdout
    assert "PACS bridge" in listing and "active" in listing and token not in listing
    assert run_cli("tokens", "revoke", "1", check=True).returncode == 0
    assert "revoked" in run_cli("tokens", "list", check=True).stdout
    missing = run_cli("tokens", "revoke", "99")
    assert missing.returncode == 2 and "no API token with id 99" in missing.stderr
