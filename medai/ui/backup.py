"""The Backup page (admin): create, verify, download, delete, prune and restore; diagnostics."""

from __future__ import annotations

import time

import streamlit as st

from medai import backup
from medai.audit import AuditAction
from medai.errors import MedaiError
from medai.store import Store, User
from medai.ui.widgets import plain


def _progress_callback(bar):
    return lambda fraction, message: bar.progress(min(max(fraction, 0.0), 1.0), text=message)


def _create(admin: User) -> None:
    with st.form("create_backup"):
        c1, c2 = st.columns([2, 1])
        label = c1.text_input("Label (optional)")
        large = c2.checkbox("Include resume states and caches", help="last.pt files and decode caches: large")
        if st.form_submit_button("Create backup", type="primary"):
            bar = st.progress(0.0, text="starting")
            try:
                path = backup.create(admin.username, label, large, _progress_callback(bar))
            except MedaiError as exc:
                st.error(plain(exc))
                return
            st.success(f"Created and verified {path.name} ({path.stat().st_size / 2**20:.1f} MB).")


def _act_on(admin: User, infos: list[backup.BackupInfo]) -> None:
    name = st.selectbox("Backup", [i.name for i in infos], key="backup_selected")
    path = backup.resolve(name)
    c1, c2, c3, c4 = st.columns(4)
    if c1.button("Verify", icon=":material/verified:"):
        try:
            manifest = backup.verify(path, admin.username)
            st.success(f"{plain(name)}: all {len(manifest['files'])} files match their SHA-256.")
        except MedaiError as exc:
            st.error(plain(exc))  # may quote archive member names
    c2.download_button("Download", lambda: path.read_bytes(), name, "application/gzip", on_click="ignore",
                       icon=":material/download:")
    if c3.button("Delete", icon=":material/delete:"):
        try:
            backup.delete(path, admin.username)
        except MedaiError as exc:
            st.error(plain(exc))
            return
        st.rerun()
    if st.session_state.pop("backup_restored", False):  # a new restore needs a new tick
        st.session_state.pop("restore_confirm", None)
    confirm = c4.checkbox("I want to restore this backup", key="restore_confirm")
    if c4.button("Restore", disabled=not confirm, icon=":material/restore:"):
        bar = st.progress(0.0, text="starting")
        try:
            safety = backup.restore(path, admin.username, _progress_callback(bar))
        except MedaiError as exc:
            st.error(f"Nothing was changed: {plain(exc)}")
            return
        st.session_state["backup_flash"] = f"Restored {name}. The state before it is kept in {safety.name}."
        st.session_state["backup_restored"] = True
        st.rerun()  # the list shows the pre-restore archive, the tick is cleared


def _prune(admin: User) -> None:
    with st.form("prune"):
        c1, c2 = st.columns(2)
        keep = c1.number_input("Keep the newest", 0, 1000, 7)
        days = c2.number_input("and/or those newer than (days, 0 = off)", 0, 3650, 0)
        if st.form_submit_button("Prune"):
            removed = backup.prune(int(keep), float(days) if days else None, admin.username)
            st.success(f"Deleted {len(removed)} archive(s).")


def render_backup(admin: User) -> None:
    st.title("Backup")
    st.caption("Archives of models/, configs/, results/ and the database, each verified against its SHA-256 "
               "manifest. A restore verifies first and keeps a pre-restore backup.")
    db = Store()
    if "backup_flash" in st.session_state:
        st.success(plain(st.session_state.pop("backup_flash")))
    week_ago = time.time() - 7 * 86400
    for event in db.audit_log(limit=5, action=AuditAction.RESTORE_INTERRUPTED):
        if event["ts"] >= week_ago:  # a restore killed half way, found and repaired at the next start
            st.warning(f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(event['ts']))}: "
                       f"{plain(event['detail'].get('outcome', 'a restore was interrupted'))}.",
                       icon=":material/build:")
    _create(admin)
    infos = backup.list_backups()
    if infos:
        st.dataframe([{"backup": i.name, "MB": round(i.size / 2**20, 1), "files": i.files,
                       "created": i.created_at, "by": i.creator} for i in infos], hide_index=True)
        _act_on(admin, infos)
        _prune(admin)
    else:
        st.info("No backups yet.")
    with st.expander("Diagnostics"):
        if st.button("Run checks"):
            from medai.doctor import run_checks

            st.dataframe([{"check": c.name, "ok": c.ok, "detail": c.detail} for c in run_checks()],
                         hide_index=True)
