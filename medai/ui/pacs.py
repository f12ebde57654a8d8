"""The PACS page: the node's worklist (received studies with their AI status), filters, triage order,
re-sending results, opening a study's images on Analyze, and (admins) the PACS endpoints."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from medai.audit import AuditAction
from medai.errors import MedaiError
from medai.pacs import queue, settings
from medai.pages import ADMIN
from medai.store import Store, User, local_time
from medai.ui.widgets import plain

OPEN_KEY = "pacs_open"  # (file name, bytes) pairs the Analyze page takes as uploads


def _worklist(db: Store) -> list[dict]:
    c1, c2, c3, c4 = st.columns(4)
    days = c1.number_input("Received in the last (days)", 1, 365, 7, key="pacs_days")
    modalities = c2.multiselect("Modality", ["CR", "DX", "CT", "MR", "OT", "SR"], key="pacs_modality")
    states = c3.multiselect("AI status", list(queue.STATES), key="pacs_states")
    urgent_first = c4.toggle("Urgent findings first", key="pacs_priority",
                             help="Studies with an urgent finding (e.g. pneumothorax) above its threshold first")
    rows = queue.items(db, tuple(states) or None, since=time.time() - days * 86400, by_priority=urgent_first)
    return [r for r in rows if not modalities or r["modality"] in modalities]


def _table(rows: list[dict]) -> None:
    st.dataframe([{"received": local_time(r["received_at"]), "study": r["study_uid"], "image": r["sop_uid"],
                   "modality": r["modality"], "AI status": r["state"], "findings": ", ".join(r["findings"]) or "-",
                   "urgency": round(r["priority"], 3) if r["priority"] else None, "model": r["model"],
                   "reason": r["reason"]} for r in rows], hide_index=True)


def _study_actions(db: Store, user: User, rows: list[dict]) -> None:
    studies = list(dict.fromkeys(r["study_uid"] for r in rows))
    if not studies:
        return
    study = st.selectbox("Study", studies, key="pacs_study")
    images = [r for r in rows if r["study_uid"] == study and r["path"] and Path(r["path"]).is_file()]
    c1, c2 = st.columns(2)
    pruned = not images and any(r["study_uid"] == study and r["state"] in queue.FINAL and r["result"]
                                and not r["result"].get("outbox") for r in rows)
    if c1.button("Open on Analyze", disabled=not images, icon=":material/radiology:",
                 help="Retention (`medai pacs prune`) deleted this study's received images; History keeps "
                      "what was analysed, the PACS the study." if pruned else None):
        st.session_state[OPEN_KEY] = [(f"{r['sop_uid']}.dcm", Path(r["path"]).read_bytes()) for r in images]
        db.audit(user.username, AuditAction.PACS_OPENED, study_uid=study)
        st.switch_page("pages/analyze.py")
    if c2.button("Re-send results", icon=":material/send:"):
        count = queue.resend(db, study)
        db.audit(user.username, AuditAction.PACS_RESEND, study_uid=study, images=count)
        st.success(f"{count} result set(s) queued to be sent again (they replace, not duplicate, what the PACS has).")


def _endpoints(db: Store, admin: User) -> None:
    cfg = settings.load(db)
    with st.form("pacs_endpoints"):
        st.markdown("**PACS endpoints**")
        c1, c2, c3 = st.columns(3)
        values = {"ae_title": c1.text_input("This node's AE title", cfg["ae_title"]),
                  "host": c2.text_input("Listen on address", cfg["host"]),
                  "port": c3.number_input("Listen on port", 1, 65535, int(cfg["port"])),
                  "dest_ae": c1.text_input("Destination AE title (results, C-STORE)", cfg["dest_ae"]),
                  "dest_host": c2.text_input("Destination host", cfg["dest_host"]),
                  "dest_port": c3.number_input("Destination port", 0, 65535, int(cfg["dest_port"] or 0)),
                  "dicomweb_url": c1.text_input("DICOMweb root (QIDO / WADO)", cfg["dicomweb_url"]),
                  "stow_url": c2.text_input("STOW-RS root (results)", cfg["stow_url"]),
                  "dicomweb_user": c3.text_input("DICOMweb user", cfg["dicomweb_user"])}
        set_already = bool(settings.password())
        new_password = st.text_input("DICOMweb password" + (" (set; leave empty to keep it)" if set_already else ""),
                                     type="password", value="")
        if st.form_submit_button("Save endpoints"):
            try:
                settings.save(admin.username, values, new_password or None, db)
                st.success("Saved. A running node (`python -m medai pacs listen`) reads them when restarted.")
            except MedaiError as exc:
                st.error(plain(str(exc)))


def render_pacs(user: User) -> None:
    st.title("PACS")
    st.caption("Images the PACS routes to this node (`python -m medai pacs listen`) and what the AI did with "
               "them; results go back into the same study as an SR and heatmap overlays.")
    db = Store()
    rows = _worklist(db)
    _table(rows)
    _study_actions(db, user, rows)
    if user.role == ADMIN:
        st.divider()
        _endpoints(db, user)
