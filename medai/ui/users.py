"""The Users page (admin): accounts, roles, API tokens, the pixel-storage setting and the audit log."""

from __future__ import annotations

import streamlit as st

from medai import auth
from medai.audit import AuditAction, describe
from medai.errors import MedaiError
from medai.store import Store, User, local_time


FLASH = "users_flash"


def _act(done: str, action, *args) -> None:
    """Run an account change; on success rerun, so that every list on the page shows it, and say what
    was done (``done``) at the top."""
    try:
        action(*args)
    except MedaiError as exc:
        st.error(str(exc))
        return
    st.session_state[FLASH] = done
    st.rerun()


def _lock_state(db: Store, user: User) -> str:
    until = auth.locked_until(db, user.username)
    return f"locked until {local_time(until)}" if until else ""


def _create_form(db: Store, admin: User) -> None:
    with st.form("create_user", clear_on_submit=True):
        st.markdown("**New user**")
        c1, c2, c3 = st.columns(3)
        name = c1.text_input("Username")
        role = c2.selectbox("Role", auth.ROLES, index=2)
        password = c3.text_input("Initial password", type="password")
        if st.form_submit_button("Create user"):
            _act(f"Created {role} {name.strip()!r}.", auth.create_user, db, name, password, role, admin.username)


def _manage_form(db: Store, admin: User, users: list[User]) -> None:
    st.markdown("**Change a user**")
    target = st.selectbox("User", [u.username for u in users], key="manage_user")
    user = next(u for u in users if u.username == target)
    c1, c2, c3 = st.columns(3)
    role = c1.selectbox("Role", auth.ROLES, index=auth.ROLES.index(user.role), key="manage_role")
    if c1.button("Change role"):
        _act(f"{target} is now {role}.", auth.set_role, db, target, role, admin.username)
    if c2.button("Enable" if user.disabled else "Disable"):
        _act(f"{target} is {'enabled' if user.disabled else 'disabled'}.", auth.set_disabled, db, target,
             not user.disabled, admin.username)
    lock = _lock_state(db, user)
    if c2.button("Unlock", disabled=not lock, help=f"{target} is {lock}" if lock else f"{target} is not locked"):
        _act(f"{target} is unlocked and may sign in again.", auth.unlock, db, target, admin.username)
    new_password = c3.text_input("New password", type="password", key="manage_password")
    if c3.button("Reset password"):
        _act(f"The password of {target} was reset.", auth.reset_password, db, target, new_password,
             admin.username)


def _tokens_section(db: Store, admin: User, users: list[User]) -> None:
    st.markdown("**API tokens** (for `python -m medai serve`; a token acts as its user, with that user's role)")
    with st.form("create_token", clear_on_submit=True):
        c1, c2 = st.columns(2)
        owner = c1.selectbox("Token for", [u.username for u in users], key="token_user")
        label = c2.text_input("Label", placeholder="what it is for, e.g. PACS bridge")
        if st.form_submit_button("Create token"):
            try:
                token_id, token = auth.create_api_token(db, owner, label, admin.username)
            except MedaiError as exc:
                st.error(str(exc))
            else:
                st.success(f"Token {token_id} for {owner}. Copy it now: it is stored only as a hash and is "
                           "not shown again.")
                st.code(token, language=None)
    tokens = db.tokens()
    if not tokens:
        return
    st.dataframe([{"id": t["id"], "user": t["username"], "label": t["label"], "token": t["prefix"] + "...",
                   "created by": t["created_by"], "created": local_time(t["created_at"]),
                   "last used": local_time(t["last_used"]),
                   "state": f"revoked {local_time(t['revoked_at'])}" if t["revoked_at"] else "active"}
                  for t in tokens], hide_index=True)
    active = [t for t in tokens if not t["revoked_at"]]
    if active:
        c1, c2 = st.columns([3, 1])
        pick = c1.selectbox("Token", active, format_func=lambda t: f"{t['id']}: {t['username']} - {t['label']}",
                            key="revoke_token")
        if c2.button("Revoke token"):
            _act(f"Token {pick['id']} is revoked.", auth.revoke_api_token, db, pick["id"], admin.username)


def render_users(admin: User) -> None:
    st.title("Users")
    if FLASH in st.session_state:
        st.success(st.session_state.pop(FLASH))
    db = Store()
    users = db.list_users()
    st.dataframe([{"username": u.username, "role": u.role, "state": "disabled" if u.disabled else "active",
                   "sign-in lock": _lock_state(db, u), "created": local_time(u.created_at),
                   "last sign-in": local_time(u.last_login)} for u in users], hide_index=True)
    _create_form(db, admin)
    _manage_form(db, admin, users)
    st.divider()
    _tokens_section(db, admin, users)
    st.divider()
    st.markdown("**Settings**")
    keep = st.toggle("Store image pixels with each analysis (PNG, never DICOM tags)",
                     value=bool(db.get_setting("store_pixels")))
    if keep != bool(db.get_setting("store_pixels")):
        db.set_setting("store_pixels", keep)
        db.audit(admin.username, AuditAction.SETTING_CHANGED, key="store_pixels", value=keep)
    st.markdown("**Audit log**")
    action = st.selectbox("Action", ["all", *sorted(a.value for a in AuditAction)])
    log = db.audit_log(500, None if action == "all" else action)
    st.dataframe([{"time": local_time(e["ts"]), "user": e["username"], "action": e["action"],
                   "detail": describe(e["detail"])} for e in log], hide_index=True)
