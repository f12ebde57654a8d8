"""Users, roles, lockout, audit and the store's schema (real bcrypt, real SQLite files)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import bcrypt
import pytest

from medai import auth
from medai.errors import MedaiError
from medai.store import MIGRATIONS, Store, StoreError
from tests.conftest import run_cli

PASSWORD = "correct horse battery"


@pytest.fixture
def store(medai_home: Path) -> Store:
    return Store()


def test_hash_is_bcrypt_cost_12_and_long_passwords_are_refused(store: Store):
    user = auth.create_user(store, "alice", PASSWORD, "radiologist")
    stored = store.password_hash(user.username)
    assert stored.startswith(b"$2b$12$") and bcrypt.checkpw(PASSWORD.encode(), stored)
    with pytest.raises(auth.PasswordPolicyError, match="72"):
        auth.create_user(store, "bob", "ä" * 40, "radiologist")  # 80 bytes in UTF-8: never truncated
    with pytest.raises(auth.PasswordPolicyError, match="at least"):
        auth.create_user(store, "bob", "short", "radiologist")
    with pytest.raises(auth.PasswordPolicyError, match="role"):
        auth.create_user(store, "bob", PASSWORD, "superuser")
    with pytest.raises(MedaiError, match="already exists"):
        auth.create_user(store, "ALICE", PASSWORD, "admin")  # usernames are case-insensitive


def test_failures_are_generic_and_lock_after_five(store: Store):
    auth.create_user(store, "alice", PASSWORD, "researcher")
    policy = auth.AuthPolicy(max_attempts=5, lockout_s=900)
    with pytest.raises(auth.AuthError) as unknown:
        auth.authenticate(store, "nobody", PASSWORD, policy, now=1000.0)
    with pytest.raises(auth.AuthError) as wrong:
        auth.authenticate(store, "alice", "wrong password!", policy, now=1000.0)
    assert str(unknown.value) == str(wrong.value) == auth.LOGIN_FAILED  # no user enumeration
    for _ in range(3):
        with pytest.raises(auth.AuthError, match="Invalid"):
            auth.authenticate(store, "alice", "wrong password!", policy, now=1000.0)
    with pytest.raises(auth.AuthError, match="Too many"):  # fifth failure locks
        auth.authenticate(store, "alice", "wrong password!", policy, now=1000.0)
    with pytest.raises(auth.AuthError, match="Too many"):  # even the right password while locked
        auth.authenticate(store, "alice", PASSWORD, policy, now=1000.0 + 899)
    assert auth.authenticate(store, "alice", PASSWORD, policy, now=1000.0 + 901).username == "alice"
    actions = [e["action"] for e in store.audit_log()]
    assert actions.count("login_failed") == 6 and "login_locked" in actions and actions[0] == "login_ok"
    assert PASSWORD not in str(store.audit_log()) and "wrong password" not in str(store.audit_log())


def test_disabled_users_cannot_sign_in_and_the_last_admin_is_kept(store: Store):
    auth.create_user(store, "root", PASSWORD, "admin")
    auth.create_user(store, "carol", PASSWORD, "radiologist")
    auth.set_disabled(store, "carol", True, actor="root")
    with pytest.raises(auth.AuthError, match="Invalid"):
        auth.authenticate(store, "carol", PASSWORD)
    with pytest.raises(MedaiError, match="last active admin"):
        auth.set_role(store, "root", "researcher", actor="root")
    with pytest.raises(MedaiError, match="last active admin"):
        auth.set_disabled(store, "root", True, actor="root")
    auth.set_role(store, "carol", "admin", actor="root")
    auth.set_disabled(store, "carol", False, actor="root")
    auth.set_role(store, "root", "researcher", actor="carol")
    assert store.get_user("root").role == "researcher"
    auth.reset_password(store, "root", "another password", actor="carol")
    assert auth.authenticate(store, "root", "another password").role == "researcher"
    changes = [(e["action"], e["detail"]) for e in store.audit_log() if e["action"] == "role_changed"]
    assert ("role_changed", {"user": "root", "old": "admin", "new": "researcher"}) in changes


def test_first_admin_only_once_and_from_env(store: Store, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDAI_ADMIN_PASSWORD", PASSWORD)
    assert auth.ensure_admin_from_env(store).role == "admin"
    assert auth.ensure_admin_from_env(store) is None  # users exist: nothing happens
    with pytest.raises(auth.AuthError, match="already done"):
        auth.create_first_admin(store, "eve", PASSWORD)


def test_roles_pages():
    assert auth.can_open("admin", "backup") and auth.can_open("admin", "users")
    assert auth.can_open("researcher", "train") and not auth.can_open("researcher", "backup")
    assert auth.can_open("radiologist", "analyze") and not auth.can_open("radiologist", "train")
    assert not auth.can_open("nobody", "analyze")


def test_store_migrates_wal_and_refuses_newer_schema(tmp_path: Path):
    path = tmp_path / "db.sqlite"
    db = Store(path)
    assert db.schema_version() == len(MIGRATIONS)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path).count_users()


def test_history_filters_and_settings(store: Store):
    result = {"results": [], "findings": ["Effusion"]}
    store.add_history("alice", "nih14-hybrid", "ab" * 32, "a.png", "cd" * 32, ["Effusion", "Mass"], result)
    store.add_history("bob", "pneumonia-hybrid", "ef" * 32, "b.png", "01" * 32, [], result, pixels=b"png")
    assert [e.file_name for e in store.history(username="alice")] == ["a.png"]
    assert [e.file_name for e in store.history(finding="Mass")] == ["a.png"]
    assert [e.file_name for e in store.history(model="pneumonia-hybrid")] == ["b.png"]
    bob = store.history(username="bob")[0]
    assert bob.has_pixels and store.history_pixels(bob.id) == b"png"
    assert store.get_setting("store_pixels") is False
    store.set_setting("store_pixels", True)
    assert store.get_setting("store_pixels") is True
    with pytest.raises(MedaiError, match="unknown setting"):
        store.set_setting("colour", "blue")


def test_users_cli(medai_home: Path):
    proc = run_cli("users", "add", "dana", "--role", "researcher", "--password-stdin", input=PASSWORD + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "dana" in run_cli("users", "list", check=True).stdout
    proc = run_cli("users", "add", "erin", "--role", "admin", "--password-stdin", input="x" * 80 + "\n")
    assert proc.returncode == 2 and "72" in proc.stderr
    run_cli("users", "set-role", "dana", "radiologist", check=True)
    run_cli("users", "disable", "dana", check=True)
    user = Store().get_user("dana")
    assert user.role == "radiologist" and user.disabled
    audit = run_cli("users", "audit", check=True).stdout
    assert "user_disabled" in audit and PASSWORD not in audit


def test_every_audited_action_is_in_the_vocabulary_and_unknown_ones_are_refused(medai_home):
    """The Users page's filter lists AuditAction; a free string that is not in it (as restore_applied once
    was missing from the filter) is refused by the store."""
    import re

    from medai.audit import AuditAction
    from tests.conftest import ROOT

    used = {m for path in (ROOT / "medai").rglob("*.py")
            for m in re.findall(r"audit\([^,()]+, *\"([a-z_]+)\"", path.read_text())}
    used |= {"user_enabled", "user_disabled"}  # chosen by a conditional expression in auth.set_disabled
    assert used and used <= {a.value for a in AuditAction}, used - {a.value for a in AuditAction}
    with pytest.raises(ValueError, match="unknown audit action"):
        Store().audit("x", "made_up_action")


def test_web_sessions_survive_a_reload_until_idle_expired_disabled_or_signed_out(medai_home):
    """The cookie's token finds its user again (a reload, a second tab); only a SHA-256 is stored; idle
    time, the absolute age, disabling the user and signing out each end it."""
    db = Store()
    auth.create_user(db, "rita", PASSWORD, "radiologist")
    policy = auth.AuthPolicy(idle_timeout_s=60, session_max_age_s=3600)
    token = auth.start_web_session(db, "rita", policy, now=1000.0)
    assert token not in str(db.path.read_bytes()) and len(token) >= 40
    assert auth.user_for_web_session(db, token, policy, now=1050.0).username == "rita"
    assert auth.user_for_web_session(db, token, policy, now=1100.0).username == "rita"  # activity renews
    assert auth.user_for_web_session(db, token + "x", policy, now=1100.0) is None
    assert auth.user_for_web_session(db, token, policy, now=1200.0) is None  # idle 100 s > 60 s
    assert auth.user_for_web_session(db, token, policy, now=1201.0) is None  # and it is gone
    old = auth.start_web_session(db, "rita", policy, now=0.0)
    for t in range(50, 3600, 50):
        auth.user_for_web_session(db, old, policy, now=float(t))
    assert auth.user_for_web_session(db, old, policy, now=3650.0) is None  # past the absolute age
    other = auth.start_web_session(db, "rita", policy, now=5000.0)
    auth.end_web_session(db, other)  # sign-out invalidates it server-side
    assert auth.user_for_web_session(db, other, policy, now=5001.0) is None
    third = auth.start_web_session(db, "rita", policy, now=6000.0)
    auth.create_user(db, "admin1", PASSWORD, "admin")
    auth.set_disabled(db, "rita", True, actor="admin1")
    assert auth.user_for_web_session(db, third, policy, now=6001.0) is None
