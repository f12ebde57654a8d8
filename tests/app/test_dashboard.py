"""The dashboard entry point renders (AppTest runs the script without a browser)."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]


def test_dashboard_lists_checkpoints(medai_home: Path, tmp_path: Path):
    app = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=60).run()
    assert not app.exception
    assert app.title[0].value == "MedAI CXR"
    assert any("not a diagnosis" in c.value for c in app.caption)

    import torch

    from medai.models import create_model
    from medai.models.checkpoint import new_card, save_checkpoint

    torch.manual_seed(0)
    (medai_home / "models").mkdir()
    save_checkpoint(create_model("resnet18", 2), new_card("resnet18", {}, "multiclass", ["NORMAL", "PNEUMONIA"],
                                                          {"image_size": 64, "mean": 0.5, "std": 0.25}),
                    medai_home / "models" / "pneumo-demo.safetensors")
    app = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=60).run()
    assert not app.exception
    table = app.dataframe[0].value
    assert "pneumo-demo" in list(table["model"]) and "NORMAL, PNEUMONIA" in list(table["labels"])
