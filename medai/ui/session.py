"""Sign-in, first-run set-up, idle timeout and the per-page role guard.

Streamlit serves every file in ``pages/`` at its own URL and may run it in a fresh session without
``dashboard.py`` (so without its navigation). The protection is therefore :func:`require_page`, which
every page calls first: no signed-in user -> the sign-in form; wrong role -> refused. Hiding a page in the
navigation is only convenience.
"""

from __future__ import annotations

import time

import streamlit as st

from medai.audit import AuditAction
from medai import auth, pages
from medai.errors import MedaiError
from medai.store import Store, User

USER_KEY = "medai_user"
SEEN_KEY = "medai_last_seen"
TOKEN_KEY = "medai_session_token"
COOKIE_SENT_KEY = "medai_cookie_sent"
CLEAR_COOKIE_KEY = "medai_clear_cookie"
TOUCH_KEY = "medai_session_touched"  # when the server-side session was last renewed


def configure_page() -> None:
    st.set_page_config(page_title="MedAI CXR", page_icon=":material/radiology:", layout="wide")


def store() -> Store:
    return Store()


def _set_cookie(value: str, max_age_s: int) -> None:
    """Write (or, with max-age 0, delete) the session cookie in the browser: Streamlit cannot set cookies
    from Python, so a zero-height component does it in the page's own origin."""
    import json

    import streamlit.components.v1 as components

    cookie = json.dumps(f"{auth.SESSION_COOKIE}={value}; path=/; max-age={max_age_s}; samesite=strict")
    components.html(f"<script>try {{ window.parent.document.cookie = {cookie}; }} catch (e) {{ "
                    f"document.cookie = {cookie}; }}</script>", height=0)


def _session_cookie() -> str | None:
    try:
        value = st.context.cookies.get(auth.SESSION_COOKIE)
    except Exception:  # noqa: BLE001 - no browser behind this session (AppTest, bare mode)
        return None
    return value if isinstance(value, str) and value else None  # AppTest hands back a stand-in object


def _resume_from_cookie() -> None:
    """A reload or a second tab starts a new Streamlit session: find its user from the cookie."""
    token = _session_cookie()
    if not token or st.session_state.get(CLEAR_COOKIE_KEY):
        return
    user = auth.user_for_web_session(store(), token)
    if user is not None:
        now = time.time()
        st.session_state.update({USER_KEY: user.username, SEEN_KEY: now, TOUCH_KEY: now, TOKEN_KEY: token,
                                 COOKIE_SENT_KEY: token})


def current_user() -> User | None:
    """The signed-in, still active user of this session, or None (also after the idle timeout)."""
    if not st.session_state.get(USER_KEY):
        _resume_from_cookie()
    name = st.session_state.get(USER_KEY)
    if not name:
        return None
    now = time.time()
    if now - st.session_state.get(SEEN_KEY, 0.0) > auth.AuthPolicy.from_env().idle_timeout_s:
        store().audit(name, AuditAction.LOGOUT, reason="idle timeout")
        sign_out()
        st.session_state["medai_notice"] = "You were signed out after a period of inactivity."
        return None
    user = store().get_user(name)
    if user is None or user.disabled:  # disabled or removed while signed in
        sign_out()
        return None
    token = st.session_state.get(TOKEN_KEY)
    if token and now - st.session_state.get(TOUCH_KEY, 0.0) > 15:  # keep the server-side session alive
        if auth.user_for_web_session(store(), token, now=now) is None:  # signed out elsewhere or expired
            sign_out()
            return None
        st.session_state[TOUCH_KEY] = now
    st.session_state[SEEN_KEY] = now
    if token and st.session_state.get(COOKIE_SENT_KEY) != token:
        _set_cookie(token, int(auth.AuthPolicy.from_env().session_max_age_s))
        st.session_state[COOKIE_SENT_KEY] = token
    return user


def session_expired() -> bool:
    """For auto-refreshing fragments: signed out or idle too long, without counting as activity."""
    idle = time.time() - st.session_state.get(SEEN_KEY, 0.0)
    return not st.session_state.get(USER_KEY) or idle > auth.AuthPolicy.from_env().idle_timeout_s


def sign_out() -> None:
    """End the session here and on the server: the cookie's token no longer signs anyone in."""
    auth.end_web_session(store(), st.session_state.get(TOKEN_KEY))
    had_cookie = bool(st.session_state.get(TOKEN_KEY) or _session_cookie())
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    if had_cookie:
        st.session_state[CLEAR_COOKIE_KEY] = True  # deleted in the browser by the next run


def _first_run_form(db: Store) -> None:
    st.subheader("Set up MedAI CXR")
    st.write("No user exists yet. Create the first administrator account (or start the app with "
             "`MEDAI_ADMIN_PASSWORD` set for unattended set-up).")
    with st.form("first_admin"):
        username = st.text_input("Administrator username", value="admin")
        password = st.text_input("Password", type="password",
                                 help=f"{auth.MIN_PASSWORD_LENGTH}+ characters, at most 72 bytes")
        repeat = st.text_input("Repeat password", type="password")
        if st.form_submit_button("Create administrator", type="primary"):
            if password != repeat:
                st.error("The two passwords differ.")
                return
            try:
                user = auth.create_first_admin(db, username, password)
            except MedaiError as exc:
                st.error(str(exc))
                return
            _start_session(user)


def _start_session(user: User) -> None:
    st.session_state.pop(CLEAR_COOKIE_KEY, None)
    st.session_state[USER_KEY] = user.username
    st.session_state[SEEN_KEY] = time.time()
    st.session_state[TOKEN_KEY] = auth.start_web_session(store(), user.username)  # cookie: next run
    st.session_state[TOUCH_KEY] = time.time()
    st.rerun()


def login_view() -> None:
    """The sign-in form (or first-run set-up when the store has no user)."""
    st.title("MedAI CXR")
    st.caption("Decision support for chest X-rays, not a diagnosis.")
    db = store()
    try:
        auth.ensure_admin_from_env(db)
    except MedaiError as exc:
        st.error(f"MEDAI_ADMIN_PASSWORD was not accepted: {exc}")
    if db.count_users() == 0:
        _first_run_form(db)
        return
    notice = st.session_state.pop("medai_notice", None)
    if notice:
        st.info(notice)
    if st.session_state.get(CLEAR_COOKIE_KEY):
        _set_cookie("", 0)
    with st.form("login"):
        username = st.text_input("Username")
        password = st.text_input("Password", type="password")
        if st.form_submit_button("Sign in", type="primary"):
            try:
                user = auth.authenticate(db, username, password)
            except auth.AuthError as exc:
                st.error(str(exc))
                return
            _start_session(user)


def require_page(page: str) -> User:
    """First call of every page: the signed-in user allowed to see ``page``; otherwise stop the script."""
    configure_page()
    user = current_user()
    if user is None:
        login_view()
        st.stop()
    if not auth.can_open(user.role, page):
        store().audit(user.username, AuditAction.ACCESS_DENIED, page=page)
        st.error(f"Your role ({user.role}) does not give access to {pages.title(page)}.")
        st.stop()
    return user


def sidebar_account(user: User) -> None:
    with st.sidebar:
        st.caption(f"Signed in as **{user.username}** ({user.role})")
        if st.button("Sign out", icon=":material/logout:"):
            store().audit(user.username, AuditAction.LOGOUT)
            sign_out()
            st.rerun()
