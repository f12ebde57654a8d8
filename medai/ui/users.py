"""The Users page (admin): accounts, roles, the pixel-storage setting and the audit log."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from medai import auth
from medai.errors import MedaiError
from medai.store import Store, User


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "never"


def _act(action, *args) -> None:
    try:
        action(*args)
    except MedaiError as exc:
        st.error(str(exc))
        return
    st.success("Done.")


def _create_form(db: Store, admin: User) -> None:
    with st.form("create_user", clear_on_submit=True):
        st.markdown("**New user**")
        c1, c2, c3 = st.columns(3)
        name = c1.text_input("Username")
        role = c2.selectbox("Role", auth.ROLES, index=2)
        password = c3.text_input("Initial password", type="password")
        if st.form_submit_button("Create user"):
            _act(auth.create_user, db, name, password, role, admin.username)


def _manage_form(db: Store, admin: User, users: list[User]) -> None:
    st.markdown("**Change a user**")
    target = st.selectbox("User", [u.username for u in users], key="manage_user")
    user = next(u for u in users if u.username == target)
    c1, c2, c3 = st.columns(3)
    role = c1.selectbox("Role", auth.ROLES, index=auth.ROLES.index(user.role), key="manage_role")
    if c1.button("Change role"):
        _act(auth.set_role, db, target, role, admin.username)
    if c2.button("Enable" if user.disabled else "Disable"):
        _act(auth.set_disabled, db, target, not user.disabled, admin.username)
    new_password = c3.text_input("New password", type="password", key="manage_password")
    if c3.button("Reset password"):
        _act(auth.reset_password, db, target, new_password, admin.username)


def render_users(admin: User) -> None:
    st.title("Users")
    db = Store()
    users = db.list_users()
    st.dataframe([{"username": u.username, "role": u.role, "state": "disabled" if u.disabled else "active",
                   "created": _when(u.created_at), "last sign-in": _when(u.last_login)} for u in users],
                 hide_index=True)
    _create_form(db, admin)
    _manage_form(db, admin, users)
    st.divider()
    st.markdown("**Settings**")
    keep = st.toggle("Store image pixels with each analysis (PNG, never DICOM tags)",
                     value=bool(db.get_setting("store_pixels")))
    if keep != bool(db.get_setting("store_pixels")):
        db.set_setting("store_pixels", keep)
        db.audit(admin.username, "setting_changed", key="store_pixels", value=keep)
    st.markdown("**Audit log**")
    action = st.selectbox("Action", ["all", "login_ok", "login_failed", "login_locked", "logout", "analysis",
                                     "access_denied", "user_created", "role_changed", "user_disabled",
                                     "user_enabled", "password_reset", "setting_changed", "training_launch",
                                     "training_cancel", "training_resume", "model_registered", "backup_created",
                                     "backup_verified", "backup_verify_failed", "backup_restored",
                                     "backup_deleted", "backup_pruned"])
    log = db.audit_log(500, None if action == "all" else action)
    st.dataframe([{"time": _when(e["ts"]), "user": e["username"], "action": e["action"],
                   "detail": str(e["detail"])} for e in log], hide_index=True)
