"""The input gate on real images: a chest model refuses brain MRI, the tibia radiograph and made-up images,
and passes chest films from every source; a refused image gets no prediction anywhere it is reported."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from medai import gate
from medai.analysis import analyze_bytes, flat_result, result_dict
from medai.data.io import DecodedImage, ImageMeta, decode_image
from medai.errors import CheckpointError
from medai.inference import Predictor
from medai.models import create_model
from medai.models.checkpoint import load_checkpoint, new_card, save_checkpoint
from medai.training.gate import _photo, _shapes
from tests.conftest import need


def _predictor(tmp_path, body_part: str | None, labels=("NORMAL", "PNEUMONIA")) -> Predictor:
    torch.manual_seed(0)
    extra = {"body_part": body_part} if body_part else {}
    card = new_card("resnet18", {}, "multiclass", list(labels), {"image_size": 64, "mean": 0.5, "std": 0.25}, **extra)
    return Predictor(load_checkpoint(save_checkpoint(create_model("resnet18", len(labels)), card,
                                                     tmp_path / f"{body_part}.safetensors")))


def _image(pixels: np.ndarray, **meta) -> DecodedImage:
    return DecodedImage(pixels.astype(np.float32), ImageMeta("png", pixels.shape[1], pixels.shape[0], 8, "L", **meta))


CHEST = {"chest_xray"}


def test_chest_films_of_every_source_pass():
    files = (sorted(need("nih-cxr14-sample/images").glob("*"))[::60] + sorted(need("nih-cxr14-bbox/images").glob("*"))[::60]
             + sorted(need("kermany-pneumonia/val").rglob("*.jpeg"))[::60]
             + [p for p in sorted(need("dicom").glob("*.dcm")) if "RG3" not in p.name])
    verdicts = gate.input_gate().check([decode_image(f) for f in files], "chest_xray")
    refused = [(f.name, v.reason) for f, v in zip(files, verdicts) if not v.accepted]
    assert len(files) >= 30 and not refused, refused
    assert all(v.source == "pixels" and v.distance <= 1 and v.probability >= 0.5 for v in verdicts)


def test_brain_mri_drawings_photos_and_upside_down_films_are_refused_by_their_pixels():
    mri = [decode_image(p) for p in sorted(need("brain-tumor-mri/pituitary").glob("*.jpg"))[::25]]
    film = decode_image(sorted(need("nih-cxr14-sample/images").glob("*"))[0]).pixels
    made = [_image(_shapes(s)) for s in range(3)] + [_image(_photo(s)) for s in range(3)] + [_image(film[::-1].copy())]
    verdicts = gate.input_gate().check(mri + made, "chest_xray")
    accepted = [i for i, v in enumerate(verdicts) if v.accepted]
    assert not accepted, [verdicts[i] for i in accepted]
    assert all(v.source == "pixels" and v.reason for v in verdicts)
    assert {v.kind for v in verdicts[:len(mri)]} == {"brain_mri"}  # named for what they are


def test_dicom_tags_refuse_before_the_pixels_are_looked_at():
    tibia = decode_image(need("dicom/pydicom_data_RG3_J2KR.dcm"))
    (v,) = gate.input_gate().check([tibia], "chest_xray")
    assert not v.accepted and v.source == "tags" and "EXTREMITY" in v.reason
    chest = decode_image(need("dicom/siim_cxr_pa_mono2.dcm"))
    for meta, word in (({"modality": "MR"}, "MR"), ({"modality": "CR", "view": "LL"}, "LL"),
                       ({"modality": "DX", "body_part": "KNEE"}, "KNEE")):
        (v,) = gate.input_gate().check([_image(chest.pixels, **meta)], "chest_xray")
        assert not v.accepted and v.source == "tags" and word in v.reason
    (v,) = gate.input_gate().check([_image(chest.pixels, modality="CR")], "brain_mri")
    assert not v.accepted and "not MR" in v.reason


def test_a_brain_model_reads_brain_mri_and_refuses_chest_films():
    mri = [decode_image(p) for p in sorted(need("brain-tumor-mri/notumor").glob("*.jpg"))[1::40]]
    chest = [decode_image(p) for p in sorted(need("nih-cxr14-sample/images").glob("*"))[:5]]
    verdicts = gate.input_gate().check(mri + chest, "brain_mri")
    assert [v.accepted for v in verdicts] == [True] * len(mri) + [False] * len(chest)


def test_expected_kind_comes_from_the_card_and_unknown_tasks_are_not_checked(tmp_path):
    assert gate.expected_kind({"task": {"body_part": "Chest"}}) == "chest_xray"
    assert gate.expected_kind({"task": {"body_part": "brain"}}) == "brain_mri"
    assert gate.expected_kind({"task": {"kind": "multiclass"}}) is None
    organ = _predictor(tmp_path, None, ("liver", "kidney"))
    analysis = analyze_bytes(organ, "organ", need("dicom/siim_cxr_pa_mono2.dcm").read_bytes(), "x.dcm")
    assert not analysis.refused and analysis.verdict.source == "none"


def test_a_refused_image_has_no_probabilities_in_any_result(tmp_path):
    chest_model = _predictor(tmp_path, "chest")
    path = sorted(need("brain-tumor-mri/glioma").glob("*.jpg"))[3]
    analysis = analyze_bytes(chest_model, "demo", path.read_bytes(), path.name)
    assert analysis.refused and analysis.prediction is None
    result = result_dict(analysis, dict(chest_model.thresholds), chest_model.ckpt.card)
    assert result["status"] == "refused" and result["findings"] == [] and result["results"] == []
    assert "Not analysed" in result["refusal"] and "brain MRI" in result["refusal"]
    flat = flat_result(analysis, chest_model.ckpt.card)
    assert "probabilities" not in flat and flat["warnings"] == [result["refusal"]]
    assert flat["results"] == [] and flat["explanation"] is None


def test_a_missing_or_broken_gate_file_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        gate.input_gate(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable input-gate file"):
        gate.input_gate(bad)
