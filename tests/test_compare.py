"""Paired AUROC comparison on real predictions: CheXNet's published scores on nih-cxr14-sample against copies
made worse on purpose, DeLong's variance against its definition, and the `compare` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medai.cli import main
from medai.errors import MedaiError
from medai.evaluation.compare import align, compare_tables, delong_paired, paired_comparison
from medai.evaluation.report import PredictionTable, read_predictions_csv
from tests.conftest import need


@pytest.fixture(scope="module")
def chexnet() -> PredictionTable:
    """CheXNet's probabilities on the 621 sample films with the films' NIH labels."""
    root = need("nih-cxr14-sample")
    ref = read_predictions_csv(root / "reference_chexnet_preds.csv")
    entries = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    findings = entries.set_index(entries["Image Index"].str.replace(".png", ".jpg"))["Finding Labels"]
    targets = np.array([[lab in findings[i].split("|") for lab in ref.labels] for i in ref.ids], dtype=int)
    assert (targets.sum(axis=0) >= 18).all()  # every finding was found for the reference's ids
    return PredictionTable(ref.ids, ref.labels, targets, ref.probs)


def blurred(table: PredictionTable, noise: float, seed: int = 0) -> PredictionTable:
    """The same films, scored worse: logit noise of ``noise`` standard deviations."""
    rng = np.random.default_rng(seed)
    logits = np.log(table.probs / (1 - table.probs)) + rng.normal(0, noise, table.probs.shape)
    return PredictionTable(table.ids, table.labels, None, 1 / (1 + np.exp(-logits)))


def test_delong_variance_is_its_definition(chexnet: PredictionTable):
    worse = blurred(chexnet, 1.0)
    y, a, b = chexnet.targets[:, 4], chexnet.probs[:, 4], np.round(worse.probs[:, 4], 2)  # with ties
    pos, neg = y == 1, y == 0

    def components(s):  # every (positive, negative) pair, ties counting half
        psi = (s[pos][:, None] > s[neg][None]) + 0.5 * (s[pos][:, None] == s[neg][None])
        return psi.mean(1), psi.mean(0)

    (a10, a01), (b10, b01) = components(a), components(b)
    cov = np.cov([a10, b10]) / pos.sum() + np.cov([a01, b01]) / neg.sum()
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    r = delong_paired(y, a, b)
    assert r["auroc_a"] == pytest.approx(roc_auc_score(y, a)) and r["auroc_b"] == pytest.approx(roc_auc_score(y, b))
    assert r["ci95"][1] - r["diff"] == pytest.approx(1.959964 * se, rel=1e-6)


def test_a_model_against_itself_differs_by_nothing(chexnet: PredictionTable):
    out = paired_comparison(chexnet.targets, chexnet.probs, chexnet.probs.copy(), chexnet.labels, n_boot=200)
    assert out["macro"]["diff"] == 0 and out["macro"]["p"] == 1 and out["macro"]["ci95"] == [0, 0]
    assert all(r["p"] == 1 and r["diff"] == 0 for r in out["per_class"].values())


def test_a_worse_copy_is_found_worse_and_a_barely_changed_one_is_not(chexnet: PredictionTable):
    much = compare_tables(chexnet, blurred(chexnet, 2.0), n_boot=400)
    m = much["macro"]
    expected = np.mean([roc_auc_score(chexnet.targets[:, c], blurred(chexnet, 2.0).probs[:, c]) for c in range(14)])
    assert m["auroc_b"] == pytest.approx(expected) and m["auroc_a"] == pytest.approx(0.777, abs=0.001)
    assert m["diff"] < -0.05 and m["ci95"][1] < 0 and m["p"] < 0.001 and m["findings"] == 14
    assert m["ci95"][0] < m["diff"] < m["ci95"][1]
    slight = compare_tables(chexnet, blurred(chexnet, 0.05), n_boot=400)["macro"]
    assert abs(slight["diff"]) < 0.005 and slight["ci95"][0] < 0 < slight["ci95"][1] and slight["p"] > 0.05


def test_tables_are_matched_by_image_not_by_row(chexnet: PredictionTable):
    order = np.random.default_rng(1).permutation(len(chexnet.ids))[:500]  # shuffled, and 121 films missing
    part = PredictionTable([chexnet.ids[i] for i in order], chexnet.labels[::-1], chexnet.targets[order][:, ::-1],
                           chexnet.probs[order][:, ::-1])
    out = compare_tables(chexnet, part, n_boot=100)
    assert out["n"] == 500 and out["only_in_a"] == 121 and out["only_in_b"] == 0
    assert out["macro"]["diff"] == pytest.approx(0, abs=1e-12)
    wrong = PredictionTable(part.ids, part.labels, 1 - part.targets, part.probs)
    with pytest.raises(MedaiError, match="disagree on the true labels"):
        compare_tables(chexnet, wrong)
    with pytest.raises(MedaiError, match="share no image id"):
        align(["a.png"], ["b.png"])
    with pytest.raises(MedaiError, match="occurs twice"):
        align(["a.png", "a.png"], ["a.png"])
    with pytest.raises(MedaiError, match="neither table"):
        compare_tables(blurred(chexnet, 1), blurred(chexnet, 1))


def test_compare_command_on_prediction_files(chexnet: PredictionTable, tmp_path: Path, capsys):
    worse = blurred(chexnet, 2.0)
    columns = {"id": worse.ids, "patient_id": [i.split("_")[0] for i in worse.ids],
               **{f"true_{lab}": chexnet.targets[:, c] for c, lab in enumerate(chexnet.labels)},
               **{f"prob_{lab}": worse.probs[:, c] for c, lab in enumerate(chexnet.labels)}}
    pd.DataFrame(columns).to_csv(tmp_path / "predictions.csv", index=False)
    reference = need("nih-cxr14-sample") / "reference_chexnet_preds.csv"
    assert main(["compare", str(tmp_path / "predictions.csv"), str(reference), "--out", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["macro"]["diff"] > 0.05 and saved["n"] == 621
    assert f"{saved['macro']['diff']:+.4f}" in printed.splitlines()[-2] and "<0.001" in printed.splitlines()[-2]
    (tmp_path / "bad.csv").write_text("id,prob_Mass\nx.png,high\n")
    assert main(["compare", str(tmp_path / "predictions.csv"), str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv: a probability or label is not a number" in capsys.readouterr().err
    (tmp_path / "noid.csv").write_text("name,prob_Mass\nx.png,0.5\n")
    assert main(["compare", str(tmp_path / "noid.csv"), str(reference)]) == 2
    assert "needs an 'id'" in capsys.readouterr().err


def test_stored_predictions_read_back_exactly(chexnet: PredictionTable, tmp_path: Path):
    """Saturated scores that differ beyond the 6th decimal stay apart in predictions.csv: a table rounded to 6
    decimals tied them, so AUROCs recomputed from it (the Metrics page's paired differences) drifted from the
    ones evaluation had stored beside it."""
    from medai.evaluation.report import write_predictions_csv

    probs = chexnet.probs.astype(np.float32).copy()
    probs[:40, 0] = 1 - np.linspace(1e-7, 4e-7, 40, dtype=np.float32)  # 40 scores within 3e-7 of one another
    path = tmp_path / "predictions.csv"
    write_predictions_csv(path, chexnet.ids, chexnet.ids, chexnet.targets, probs, chexnet.labels)
    back = read_predictions_csv(path)
    assert back.ids == chexnet.ids and np.array_equal(back.targets, chexnet.targets)
    assert np.array_equal(back.probs, probs.astype(float))
    assert len(np.unique(back.probs[:40, 0])) == len(np.unique(probs[:40, 0])) > 1
    assert roc_auc_score(back.targets[:, 0], back.probs[:, 0]) == roc_auc_score(chexnet.targets[:, 0], probs[:, 0])
