"""The PACS page through AppTest, over a queue filled by the real node code (real images, the shipped
chest model): the worklist with AI status and reasons, triage order, re-send (audited), opening a study on
Analyze, and the admins' endpoints with a password that is never shown back nor stored in the database."""

from __future__ import annotations

import json
import os

from pydicom.uid import generate_uid

from medai import auth
from medai.inference import Predictor
from medai.pacs import queue, settings, work
from medai.pacs.node import Node
from medai.store import Store
from tests.app.test_dashboard import PASSWORD, ROOT, page_as
from tests.conftest import need
from tests.test_pacs import MODEL, dx_from_png, kermany_pngs


def filled_queue() -> tuple[str, str]:
    predictor = Predictor(ROOT / "models" / f"{MODEL}.safetensors")
    db = Store()
    chest, other = generate_uid(), generate_uid()
    pneumonia, normal = kermany_pngs(2)
    for raw in (dx_from_png(pneumonia, chest), dx_from_png(normal, chest), dx_from_png(normal, other, modality="CT")):
        work.receive(db, raw, predictor, MODEL)
    Node(predictor, MODEL, store=db).drain()  # no destination: analysed, results wait in the outbox
    return chest, other


def test_worklist_triage_resend_and_open_on_analyze(medai_home):
    need("kermany-pneumonia")
    chest, other = filled_queue()
    auth.create_user(Store(), "rad1", PASSWORD, "radiologist")
    at = page_as("pacs.py", "rad1")
    assert not at.exception
    table = at.dataframe[0].value
    assert sorted(table["AI status"]) == [queue.DONE, queue.DONE, queue.SKIPPED]
    assert "modality CT" in " ".join(table["reason"])
    assert "PNEUMONIA" in " ".join(table["findings"])
    at.toggle(key="pacs_priority").set_value(True).run()
    assert at.dataframe[0].value["findings"].iloc[0] == "PNEUMONIA"  # the urgent finding first
    at.multiselect(key="pacs_states").set_value([queue.SKIPPED]).run()
    assert list(at.dataframe[0].value["study"]) == [other]
    at.multiselect(key="pacs_states").set_value([]).run()
    at.selectbox(key="pacs_study").set_value(chest).run()
    assert not [f for f in at.get("form") if f.form_id == "pacs_endpoints"]  # radiologists: no endpoints
    at = next(b for b in at.button if b.label == "Open on Analyze").click().run()
    assert [name for name, _ in at.session_state["pacs_open"]] and len(at.session_state["pacs_open"]) == 2
    db = Store()
    assert db.audit_log(action="pacs_opened")[0]["detail"]["study_uid"] == chest


def test_resend_is_audited(medai_home):
    need("kermany-pneumonia")
    chest, _ = filled_queue()
    db = Store()
    for item in queue.items(db, (queue.DONE,)):
        queue.update(db, item["id"], state=queue.SENT)
    auth.create_user(db, "rad1", PASSWORD, "radiologist")
    at = page_as("pacs.py", "rad1")
    at.selectbox(key="pacs_study").set_value(chest).run()
    at = next(b for b in at.button if b.label == "Re-send results").click().run()
    assert any("2 result set(s)" in s.value for s in at.success)
    assert {r["state"] for r in queue.items(db) if r["study_uid"] == chest} == {queue.DONE}
    assert db.audit_log(action="pacs_resend")[0]["detail"] == {"study_uid": chest, "images": 2}


def test_admins_set_endpoints_and_the_password_is_never_shown_or_stored_in_the_database(medai_home):
    db = Store()
    auth.create_user(db, "admin1", PASSWORD, "admin")
    auth.create_user(db, "res1", PASSWORD, "researcher")
    at = page_as("pacs.py", "admin1")
    form = [t for t in at.text_input]
    by_label = {t.label: t for t in form}
    by_label["Destination AE title (results, C-STORE)"].set_value("ORTHANC")
    by_label["DICOMweb root (QIDO / WADO)"].set_value("https://pacs.example/dicom-web")
    by_label["DICOMweb user"].set_value("medai")
    next(t for t in form if t.label.startswith("DICOMweb password")).set_value("s3cret-pw")
    at = next(b for b in at.button if b.label == "Save endpoints").click().run()
    assert not at.exception and any("Saved" in s.value for s in at.success), [e.value for e in at.error]
    cfg = settings.load(db)
    assert cfg["dest_ae"] == "ORTHANC" and cfg["dicomweb_user"] == "medai" and settings.password() == "s3cret-pw"
    assert oct(os.stat(settings.credentials_path()).st_mode & 0o777) == "0o600"
    assert all(b"s3cret-pw" not in f.read_bytes() for f in db.path.parent.glob(db.path.name + "*"))
    assert "s3cret-pw" not in json.dumps(db.audit_log())
    again = page_as("pacs.py", "admin1")
    shown = [t.value for t in again.text_input]
    assert "s3cret-pw" not in shown and any("(set; leave empty" in t.label for t in again.text_input)
    bad = page_as("pacs.py", "admin1")
    next(t for t in bad.text_input if t.label == "DICOMweb root (QIDO / WADO)").set_value("https://u:p@pacs/dicom-web")
    bad = next(b for b in bad.button if b.label == "Save endpoints").click().run()
    assert any("credentials" in e.value for e in bad.error)
    refused = page_as("pacs.py", "res1")
    assert not refused.get("dataframe")
