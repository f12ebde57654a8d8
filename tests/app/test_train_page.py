"""The Train page through AppTest: launch a real (tiny) run, watch it finish with curves, register it;
cancel and resume from the page; radiologists are refused."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from medai import auth
from medai.catalog import list_models
from medai.models.checkpoint import read_card
from medai.store import Store
from medai import jobs
from medai.runs import read_progress
from tests.app.test_dashboard import PASSWORD, ROOT, app, page_as, sign_in
from tests.conftest import need


def train_page(role: str = "researcher") -> AppTest:
    auth.create_user(Store(), "res1", PASSWORD, role)
    at = sign_in(app().run(), "res1")
    return at.switch_page("pages/train.py").run()


def launch_tiny(at: AppTest, epochs: int, gpus: int | None = None, lr_scaling: str | None = None,
                ema: float | None = None, attention: float | None = None, ramp: float | None = None,
                balance: float | None = None, keep_epochs: bool = False) -> AppTest:
    need("pneumoniamnist")
    at.selectbox(key="train_recipe").set_value(ROOT / "configs" / "hybrid_pneumoniamnist.yaml").run()
    key = "hybrid_pneumoniamnist"
    if gpus:  # form widgets: set together, then submitted
        at.number_input(key=f"nproc_{key}").set_value(gpus)
        at.selectbox(key=f"lrs_{key}").set_value(lr_scaling)
    if ema:
        at.number_input(key=f"ema_{key}").set_value(ema)
    if ramp:
        at.number_input(key=f"ramp_{key}").set_value(ramp)
    if attention:
        at.number_input(key=f"att_{key}").set_value(attention)
    if balance:
        at.number_input(key=f"balance_{key}").set_value(balance)
    if keep_epochs:
        at.checkbox(key=f"keep_{key}").check()
    at.number_input(key=f"size_{key}").set_value(32)
    at.number_input(key=f"epochs_{key}").set_value(epochs)
    at.text_input(key=f"name_{key}").set_value("ui-tiny")
    return next(b for b in at.button if b.label == "Start training").click().run()


def rerun_until(at: AppTest, state: str, timeout: float = 300) -> AppTest:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        shown = [m.value for m in at.metric if m.label == "state"]
        if shown and shown[0] == state:
            return at
        time.sleep(1)
    raise AssertionError(f"state {state} not shown; metrics: {[(m.label, m.value) for m in at.metric]}")


def test_launch_watch_finish_and_register(medai_home: Path):
    at = launch_tiny(train_page(), epochs=2, attention=0.5, balance=0.5, keep_epochs=True)
    assert not at.exception
    assert any("Started ui-tiny" in s.value for s in at.success), [e.value for e in at.error]
    at = rerun_until(at, "finished")
    assert not at.exception
    run = jobs.list_jobs()[0]
    trained = read_card(run.run_dir / "best.safetensors")["training_config"]["train"]
    assert trained["attention_loss"] == 0.5 and trained["patient_balance"] == 0.5 and trained["keep_epochs"]
    assert sorted(p.name for p in (run.run_dir / "epochs").iterdir()) == ["epoch-001.safetensors",
                                                                           "epoch-002.safetensors"]
    # MedMNIST arrays are no films to segment: the term adds nothing, and the log says so
    assert "no training film had a usable chest segmentation" in (run.run_dir / "train.log").read_text()
    assert at.get("plotly_chart"), "training curves are drawn"
    assert [m.value for m in at.metric if m.label == "epoch"] == ["2/2"]
    form_input = next(t for t in at.text_input if t.label == "Model name")
    form_input.set_value("ui-tiny-model")
    at = next(b for b in at.button if b.label == "Register as model").click().run()
    assert any("as ui-tiny-model; it is now selectable" in s.value for s in at.success)
    table = at.dataframe[0].value  # the run table says so too (it lagged behind the run panel)
    assert list(table["model"]) == ["ui-tiny-model"] and list(table["state"]) == ["finished"]
    assert list(table["progress"]) == [100]
    assert "ui-tiny-model" in [e.name for e in list_models()[0]]


def test_cancel_and_resume_from_the_page(medai_home: Path):
    at = launch_tiny(train_page(), epochs=30)
    at = rerun_until(at, "running")
    next(b for b in at.button if b.label == "Cancel").click().run()
    at = rerun_until(at, "cancelled", timeout=120)
    next(b for b in at.button if b.label == "Resume").click().run()
    at = rerun_until(at, "running")
    run_id = jobs.list_jobs()[0].run_id
    jobs.cancel(run_id, "res1")  # leave nothing running behind the test
    rerun_until(at, "cancelled", timeout=120)
    actions = [e["action"] for e in Store().audit_log()]
    assert {"training_launch", "training_cancel", "training_resume"} <= set(actions)


def test_bad_values_are_refused_before_anything_starts(medai_home: Path):
    at = train_page()
    at.selectbox(key="train_recipe").set_value(ROOT / "configs" / "hybrid_pneumoniamnist.yaml").run()
    at.text_input(key="lr_hybrid_pneumoniamnist").set_value("fast please")
    next(b for b in at.button if b.label == "Start training").click().run()
    assert any("Not started" in e.value and "lr" in e.value for e in at.error)
    assert Store().runs() == []


def test_a_recipe_that_adds_another_sets_films_says_so(medai_home: Path):
    need("kermany-pneumonia")
    at = train_page()
    at.selectbox(key="train_recipe").set_value(ROOT / "configs" / "hybrid_pneumonia_nih_adults.yaml").run()
    said = [c.value for c in at.caption if "Training also draws films from" in c.value]
    assert said == ["Training also draws films from nih-cxr14-train-224 (train split, at most 506 per label: "
                    "NORMAL from No Finding, PNEUMONIA from Pneumonia or Consolidation). Validation is this "
                    "dataset's alone."]
    at.selectbox(key="train_recipe").set_value(ROOT / "configs" / "hybrid_pneumonia.yaml").run()
    assert not [c for c in at.caption if "Training also draws" in c.value]


def test_radiologists_cannot_train(medai_home: Path):
    auth.create_user(Store(), "rad1", PASSWORD, "radiologist")
    direct = page_as("train.py", "rad1")
    assert any("does not give access" in e.value for e in direct.error)
    assert not any(b.label == "Start training" for b in direct.button)


def test_one_process_where_there_is_at_most_one_gpu(medai_home: Path):
    at = train_page()
    shown = next(n for n in at.number_input if n.label == "GPUs (processes)")
    assert shown.value == 1 and shown.disabled == (not torch.cuda.is_available() or
                                                   torch.cuda.device_count() < 2)


def test_a_multi_gpu_machine_launches_a_data_parallel_run(medai_home: Path, monkeypatch):
    # the page asks torch how many GPUs there are; pretend 4 so that it offers data-parallel training,
    # which then really runs as 2 torchrun processes (gloo on this CPU machine), averaging the weights
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    at = launch_tiny(train_page(), epochs=1, gpus=2, lr_scaling="linear", ema=0.99, ramp=1.0)
    assert any("Started ui-tiny" in s.value for s in at.success), [e.value for e in at.error]
    at = rerun_until(at, "finished")
    run = jobs.list_jobs()[0]
    records = [r for r in read_progress(run.run_dir) if r["type"] == "epoch"]
    assert records and records[0]["world_size"] == 2 and records[0]["shards_overlap"] == 0
    assert 0 <= records[0]["val_auroc_live"] <= 1
    card = read_card(run.run_dir / "best.safetensors")
    assert card["distributed"]["lr_scaling"] == "linear" and card["training_config"]["train"]["ema_decay"] == 0.99
    assert card["training_config"]["train"]["ema_ramp"] == 1.0
    assert any("Data-parallel on 2 processes" in c.value for c in at.caption)
