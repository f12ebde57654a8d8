"""The Metrics page through AppTest on a real evaluation: the numbers shown are those in eval.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medai import auth
from medai.config import load_config
from medai.store import Store
from medai.training.trainer import train
from tests.app.test_dashboard import PASSWORD, app, sign_in
from tests.conftest import need, tiny_config


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    need("pneumoniamnist")
    config = tiny_config(tmp_path, "pneumoniamnist", data={"labels": ["normal", "pneumonia"], "max_samples": 200},
                         train={"epochs": 2})
    return train(load_config(config))


def test_metrics_page_shows_the_stored_evaluation(medai_home: Path, finished_run: Path):
    auth.create_user(Store(), "rad1", PASSWORD, "radiologist")
    at = sign_in(app().run(), "rad1").switch_page("pages/metrics.py").run()
    at.multiselect(key="metrics_models").set_value([finished_run.name]).run()
    assert not at.exception and not at.error
    expected = json.loads((finished_run / "eval.json").read_text())["val"]
    table = at.dataframe[0].value  # the per-class table comes first
    shown = table.set_index("class")
    for label in ("normal", "pneumonia"):
        assert shown.loc[label, "auroc"] == pytest.approx(expected["per_class"][label]["auroc"])
        assert shown.loc[label, "sensitivity"] == pytest.approx(expected["per_class"][label]["sensitivity"])
        assert shown.loc[label, "support"] == expected["per_class"][label]["support"]
    assert shown.loc["macro", "auroc"] == pytest.approx(expected["macro"]["auroc"])
    assert len(at.get("plotly_chart")) >= 4  # ROC, PR, calibration, confusion
    # the threshold explorer re-computes sensitivity/specificity at the chosen threshold
    at.slider(key=f"thr_value_{finished_run.name}").set_value(0.0).run()
    assert [m.value for m in at.metric if m.label == "sensitivity"] == ["1.000"]


def test_comparing_two_models_on_the_same_data(medai_home: Path, finished_run: Path, tmp_path: Path):
    need("pneumoniamnist")
    (tmp_path / "b").mkdir()
    other = train(load_config(tiny_config(tmp_path / "b", "pneumoniamnist",
                                          data={"labels": ["normal", "pneumonia"], "max_samples": 200},
                                          train={"epochs": 1, "seed": 1})))
    auth.create_user(Store(), "res1", PASSWORD, "researcher")
    at = sign_in(app().run(), "res1").switch_page("pages/metrics.py").run()
    at.multiselect(key="metrics_models").set_value([finished_run.name, other.name]).run()
    assert not at.exception and not at.error
    comparison = at.dataframe[0].value  # the comparison table comes first
    assert list(comparison["model"]) == [finished_run.name, other.name]
    assert (comparison["images"] == 200).all()
    # the second model against the first on the same 200 images: the difference of the macro AUROCs shown
    paired = next(d.value for d in at.dataframe if "difference" in d.value.columns and "against" in d.value.columns)
    row = paired.iloc[0]
    assert (row["model"], row["against"], row["images"]) == (other.name, finished_run.name, 200)
    shown = comparison.set_index("model")["macro auroc"]
    assert row["difference"] == pytest.approx(shown[other.name] - shown[finished_run.name])
    low, high = (float(x) for x in row["95% CI"].split(" to "))
    assert low <= row["difference"] <= high and 0 <= row["p"] <= 1


def test_metrics_labels_read_as_a_clinician_expects(medai_home: Path, finished_run: Path):
    """Was: 2x2 rows 'true positive / true negative', a confusion matrix whose rows ran the other way
    than its columns, and the server's absolute data path in the header."""
    from medai.paths import data_dir
    from medai.ui.metrics import confusion_figure

    auth.create_user(Store(), "rad1", PASSWORD, "radiologist")
    at = sign_in(app().run(), "rad1").switch_page("pages/metrics.py").run()
    at.multiselect(key="metrics_models").set_value([finished_run.name]).run()
    two_by_two = next(d.value for d in at.dataframe if "predicted positive" in d.value.columns)
    assert list(two_by_two[""]) == ["actually positive", "actually negative"]
    header = next(h.value for h in at.subheader if h.value.startswith(finished_run.name))
    assert str(data_dir()) not in header and "/" not in header.split("(", 1)[1]
    fig = confusion_figure([[5, 1], [2, 7]], ["normal", "pneumonia"])
    assert fig.layout.yaxis.autorange == "reversed" and list(fig.data[0].y) == list(fig.data[0].x)


def test_comparing_models_of_different_tasks_says_so(medai_home: Path, finished_run: Path):
    shipped = Path(__file__).resolve().parents[2] / "models" / "brain-mri-hybrid.safetensors"
    if not shipped.is_file():
        pytest.skip("the shipped brain MRI model is absent")
    need("brain-tumor-mri")
    auth.create_user(Store(), "res1", PASSWORD, "researcher")
    at = sign_in(app().run(), "res1").switch_page("pages/metrics.py").run()
    at.multiselect(key="metrics_models").set_value([finished_run.name, "brain-mri-hybrid"]).run()
    assert any("different tasks" in w.value for w in at.warning)
    comparison = at.dataframe[0].value  # the comparison table comes first
    assert len(set(comparison["task"])) == 2
