"""The PACS worklist in a real browser: a radiologist opens a study the node analysed on Analyze, and a
study whose files retention deleted cannot be opened, with the reason."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import expect
from pydicom.uid import generate_uid

from tests.conftest import ROOT
from tests.e2e.conftest import settle, shot, sign_in

pytestmark = pytest.mark.e2e


def _node_analysed(home: Path, monkeypatch) -> tuple[str, str, list[str]]:
    """Two studies the node received and analysed (in the dashboard's own home); the second is sent and
    then pruned. Returns both Study UIDs and the first study's SOP Instance UIDs."""
    from medai.inference import Predictor
    from medai.pacs import queue, work
    from medai.pacs.node import Node
    from medai.store import Store
    from tests.test_pacs import MODEL, dx_from_png, kermany_pngs

    monkeypatch.setenv("MEDAI_HOME", str(home))
    db, predictor = Store(home / "data" / "medai.db"), Predictor(ROOT / "models" / f"{MODEL}.safetensors")
    fresh, old = generate_uid(), generate_uid()
    pneumonia, normal = kermany_pngs(2)
    for raw in (dx_from_png(pneumonia, fresh), dx_from_png(normal, fresh), dx_from_png(normal, old)):
        work.receive(db, raw, predictor, MODEL)
    Node(predictor, MODEL, store=db).drain()
    for item in queue.items(db, states=(queue.DONE,)):
        if item["study_uid"] == old:
            queue.update(db, item["id"], state=queue.SENT)
    with db.connect() as conn:
        conn.execute("UPDATE pacs_queue SET updated_at = ? WHERE study_uid = ?", (time.time() - 40 * 86400, old))
    pruned, freed = work.prune(db, 30 * 86400)
    assert pruned == 1 and freed > 0
    return fresh, old, [i["sop_uid"] for i in queue.items(db) if i["study_uid"] == fresh]


def test_a_study_from_the_worklist_opens_on_analyze_and_a_pruned_one_says_why_not(server, e2e_home, page,
                                                                                  monkeypatch):
    fresh, old, sops = _node_analysed(e2e_home, monkeypatch)
    sign_in(page, server, "rad1")
    page.goto(f"{server}/pacs")  # the session cookie signs the new page in
    page.get_by_text("Signed in as rad1").wait_for()
    study = page.get_by_label("Study")
    study.wait_for()
    settle(page)
    study.click()
    page.get_by_role("option", name=old).click()
    settle(page)
    open_button = page.get_by_role("button", name="Open on Analyze")
    expect(open_button).to_be_disabled()  # retention deleted the received images
    open_button.hover()
    page.get_by_text("Retention (medai pacs prune) deleted this study's received images").wait_for(timeout=10_000)
    study.click()
    page.get_by_role("option", name=fresh).click()
    settle(page)
    expect(open_button).to_be_enabled(timeout=30_000)
    shot(page, "pacs-worklist")
    open_button.click()
    page.get_by_text("2 images").wait_for(timeout=180_000)  # Analyze took both images of the study
    page.get_by_role("heading", name=f"{sorted(sops)[0]}.dcm").or_(
        page.get_by_role("heading", name=f"{sorted(sops)[1]}.dcm")).first.wait_for(timeout=180_000)
