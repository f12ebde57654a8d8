"""The Analyze page's logic on real images: decisions, confidence words, the JSON result (no patient tags)
and the one-page PDF report (patient fields, the reader's threshold, positive heatmaps)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from medai.analysis import analyze_and_explain, analyze_bytes, decide, default_method, result_dict
from medai.data.transforms import PreprocessSpec
from medai.inference import confidence_band
from medai.report import report_pdf
from medai.inference import Predictor
from medai.models import create_model
from medai.models.checkpoint import load_checkpoint, new_card, save_checkpoint
from tests.conftest import need


@pytest.fixture
def chest_predictor(tmp_path) -> Predictor:
    torch.manual_seed(0)
    card = new_card("resnet18", {}, "multiclass", ["NORMAL", "PNEUMONIA"],
                    {"image_size": 64, "mean": 0.5, "std": 0.25}, body_part="chest")
    path = save_checkpoint(create_model("resnet18", 2), card, tmp_path / "demo.safetensors")
    return Predictor(load_checkpoint(path))


def test_decide_orders_positives_first_with_confidence_words():
    rows = decide(["A", "B", "C", "D"], [0.25, 0.95, 0.55, 0.05], {"A": 0.5, "B": 0.5, "C": 0.5, "D": 0.5})
    assert [r["finding"] for r in rows] == ["B", "C", "A", "D"]
    assert [r["positive"] for r in rows] == [True, True, False, False]
    assert [r["confidence"] for r in rows] == ["very likely", "borderline", "unlikely", "very unlikely"]
    assert confidence_band(0.7, 0.5) == "likely"
    # moving one threshold re-decides only that finding
    assert [r["positive"] for r in decide(["A", "B"], [0.2, 0.95], {"A": 0.1, "B": 0.99})] == [True, False]


def test_dicom_result_has_no_patient_tags_and_report_is_one_pdf_page(chest_predictor: Predictor):
    path = need("dicom/siim_cxr_pa_mono2.dcm")
    data = path.read_bytes()
    analysis = analyze_bytes(chest_predictor, "demo", data, path.name)
    assert analysis.image.meta.source_format == "dicom" and analysis.image.meta.view == "PA"
    thresholds = {"PNEUMONIA": 0.42}  # the reader moved the one decision
    result = result_dict(analysis, thresholds, chest_predictor.ckpt.card)
    text = json.dumps(result)
    assert "16d7f894" not in text  # PatientID / PatientName of this file
    assert result["image_sha256"] == __import__("hashlib").sha256(data).hexdigest()
    assert [r["finding"] for r in result["results"]] == ["PNEUMONIA"]  # NORMAL is never a finding
    assert result["findings"] == [r["finding"] for r in result["results"] if r["positive"]]
    assert result["thresholds"] == {"PNEUMONIA": {"value": 0.42, "model": 0.5, "source": "reader"}}
    assert result["status"] == "analysed" and result["input_gate"]["accepted"]
    shown = (analysis.image.pixels * 255 + 0.5).astype(np.uint8)
    overlay = np.stack([shown] * 3, axis=-1)
    pdf = report_pdf(result, shown, [("gradcam heatmap for PNEUMONIA", overlay)], reader="rad1",
                     study=analysis.image.study)
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == 1
    assert b"MedAI CXR analysis report" in pdf
    text = pdf_text(pdf)
    # the patient and study fields are printed in the report (and only there), with model, reader, gate
    assert "16d7f894-55d7-4d95-8957-d18987f0e981" in text and "Study UID:" in text and "Sex:" in text
    assert chest_predictor.ckpt.sha256[:32] in text and "Reader:" in text and "rad1" in text
    assert "Input check: passed" in text and "gradcam heatmap for PNEUMONIA" in text
    assert "0.42 changed by reader (model 0.50)" in text


def pdf_text(pdf: bytes) -> str:
    import io

    from pypdf import PdfReader

    return " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def test_a_png_report_says_it_has_no_patient_fields_and_a_refused_one_shows_no_findings(chest_predictor: Predictor):
    path = sorted(need("brain-tumor-mri/glioma").glob("*.jpg"))[0]
    analysis = analyze_bytes(chest_predictor, "demo", path.read_bytes(), path.name)
    assert analysis.refused and analysis.image.study == {}
    result = result_dict(analysis, {"PNEUMONIA": 0.5}, chest_predictor.ckpt.card)
    text = pdf_text(report_pdf(result, (analysis.image.pixels * 255).astype(np.uint8), [], "rad1"))
    assert "no DICOM patient or study fields" in text and "Input check: REFUSED" in text
    assert "PNEUMONIA" not in text and "Probability" not in text


def test_a_two_class_model_makes_one_decision_and_marks_the_readers_threshold(chest_predictor: Predictor):
    """Was: NORMAL had its own slider, so NORMAL and PNEUMONIA could both be 'positive'."""
    assert chest_predictor.negative == "NORMAL" and list(chest_predictor.thresholds) == ["PNEUMONIA"]
    rows = decide(["NORMAL", "PNEUMONIA"], [0.7, 0.3], {"PNEUMONIA": 0.25}, {"PNEUMONIA": 0.5})
    assert [(r["finding"], r["positive"], r["threshold_source"], r["model_threshold"]) for r in rows] == [
        ("PNEUMONIA", True, "reader", 0.5)]
    assert decide(["NORMAL", "PNEUMONIA"], [0.7, 0.3], {"PNEUMONIA": 0.5})[0]["threshold_source"] == "model"
    brain = {"task": {"kind": "multiclass"}, "labels": ["glioma", "meningioma", "notumor", "pituitary"]}
    from medai.inference import negative_label

    assert negative_label(brain) == "notumor" and negative_label({**brain, "task": {"kind": "multilabel"}}) is None


def test_one_pass_analysis_explains_the_finding_a_callers_thresholds_pick(chest_predictor: Predictor):
    """The Analyze page's first heatmap: the finding is chosen from the probabilities of the same forward
    pass, with the page's thresholds, and the prediction equals the predictor's own."""
    path = need("dicom/siim_cxr_pa_mono2.dcm")
    data = path.read_bytes()
    seen: list[list[float]] = []

    def pick(probabilities: list[float]) -> list[str]:
        seen.append(list(probabilities))
        return [decide(["NORMAL", "PNEUMONIA"], probabilities, {"PNEUMONIA": 0.0})[0]["finding"]]
    analysis, exp = analyze_and_explain(chest_predictor, "demo", data, path.name, pick)
    assert list(exp.heatmaps) == ["PNEUMONIA"]  # positive only at its threshold of 0
    assert seen == [analysis.prediction.probabilities] and len(seen[0]) == 2
    plain = analyze_bytes(chest_predictor, "demo", data, path.name)
    np.testing.assert_allclose(analysis.prediction.probabilities, plain.prediction.probabilities, atol=1e-4)
    heat = exp.heatmaps.small["PNEUMONIA"]
    assert heat.min() >= 0 and heat.max() <= 1 and heat.std() > 0


@pytest.mark.parametrize("training_config,expected", [
    ({}, "gradcam++"),  # EfficientNet-Lite's own default at its head (stride 32)
    ({"model": {"cam_method": "layercam"}}, "layercam"),  # what the card names
    ({"train": {"attention_loss": 0.1}}, "gradcam"),  # the map the attention loss trained
    ({"model": {"cam_method": "hirescam"}, "train": {"attention_loss": 0.1}}, "hirescam"),
])
def test_the_default_heatmap_comes_from_the_card(tmp_path, training_config, expected):
    model = create_model("efficientnet_lite0", 2).eval()
    card = new_card("efficientnet_lite0", {}, "multilabel", ["a", "b"], PreprocessSpec(64).to_dict(),
                    training_config=training_config)
    predictor = Predictor(save_checkpoint(model, card, tmp_path / "m.safetensors"))
    assert default_method(predictor) == expected
