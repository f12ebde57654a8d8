"""Users, roles and logins: bcrypt hashes, lockout after repeated failures, generic errors.

- Passwords are hashed with bcrypt at cost >= 12. bcrypt only reads the first 72 bytes, so a longer
  password is refused with a clear message rather than silently truncated.
- :func:`authenticate` answers every failure (unknown user, wrong password, disabled account) with the
  same :class:`AuthError` text and does a bcrypt check even for unknown users, so neither the message nor
  the timing tells whether a user exists. Failures are counted per typed username; after
  ``MEDAI_LOCKOUT_ATTEMPTS`` (5) the name is locked for ``MEDAI_LOCKOUT_MINUTES`` (15).
- Every login, lockout and user change is written to the audit log (never the password).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass

import bcrypt

from medai.audit import AuditAction
from medai.errors import MedaiError
from medai.pages import ROLES, page_access
from medai.paths import env_number
from medai.store import Store, User

# Which pages each role may open (from the page table). Pages check this themselves
# (medai.ui.session.require_page).
PAGE_ACCESS: dict[str, frozenset[str]] = page_access()
BCRYPT_COST = 12
BCRYPT_MAX_BYTES = 72
MIN_PASSWORD_LENGTH = 10
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{1,63}$")
LOGIN_FAILED = "Invalid username or password."
LOGIN_LOCKED = "Too many failed sign-in attempts. Try again later or ask an administrator."


class AuthError(MedaiError):
    """A sign-in failed; the message never says why in a way that reveals whether a user exists."""


class PasswordPolicyError(MedaiError):
    """A new password or username does not meet the rules."""


@dataclass(frozen=True)
class AuthPolicy:
    max_attempts: int = 5
    lockout_s: float = 15 * 60
    idle_timeout_s: float = 30 * 60
    session_max_age_s: float = 12 * 3600  # a signed-in browser session ends after this, active or not

    @classmethod
    def from_env(cls) -> AuthPolicy:
        return cls(max_attempts=int(env_number("MEDAI_LOCKOUT_ATTEMPTS", 5)),
                   lockout_s=60 * env_number("MEDAI_LOCKOUT_MINUTES", 15),
                   idle_timeout_s=60 * env_number("MEDAI_IDLE_TIMEOUT_MINUTES", 30),
                   session_max_age_s=3600 * env_number("MEDAI_SESSION_HOURS", 12))


def can_open(role: str, page: str) -> bool:
    return page in PAGE_ACCESS.get(role, frozenset())


def check_password_policy(password: str) -> bytes:
    """The UTF-8 bytes of an acceptable new password, or :class:`PasswordPolicyError`."""
    raw = password.encode("utf-8")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordPolicyError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(raw) > BCRYPT_MAX_BYTES:
        raise PasswordPolicyError(f"the password is {len(raw)} bytes long in UTF-8; at most {BCRYPT_MAX_BYTES} "
                                  "bytes are used by bcrypt, so choose a shorter one (nothing is truncated)")
    return raw


def hash_password(password: str) -> bytes:
    return bcrypt.hashpw(check_password_policy(password), bcrypt.gensalt(rounds=BCRYPT_COST))


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> bytes:
    return bcrypt.hashpw(b"medai-timing-equaliser", bcrypt.gensalt(rounds=BCRYPT_COST))


def _password_matches(password: str, stored: bytes | None) -> bool:
    raw = password.encode("utf-8")
    if len(raw) > BCRYPT_MAX_BYTES:  # could never have been set; still spend the same time
        raw = b""
    # checkpw compares in constant time; unknown users are checked against a dummy hash
    matches = bcrypt.checkpw(raw, stored or _dummy_hash())
    return matches and stored is not None and len(password) > 0


def authenticate(store: Store, username: str, password: str, policy: AuthPolicy | None = None,
                 now: float | None = None) -> User:
    """The signed-in user, or :class:`AuthError` with a generic message."""
    policy = policy or AuthPolicy.from_env()
    now = time.time() if now is None else now
    name = username.strip()
    failures, locked_until = store.attempts(name)
    if locked_until > now:
        store.audit(name, AuditAction.LOGIN_LOCKED)
        raise AuthError(LOGIN_LOCKED)
    user = store.get_user(name) if name else None
    ok = _password_matches(password, store.password_hash(name) if user else None)
    if not ok or user is None or user.disabled:
        failures += 1
        locked = failures >= policy.max_attempts
        store.set_attempts(name, 0 if locked else failures, now + policy.lockout_s if locked else 0.0)
        store.audit(name, AuditAction.LOGIN_FAILED, reason="disabled" if ok and user and user.disabled else "credentials",
                    locked=locked)
        raise AuthError(LOGIN_LOCKED if locked else LOGIN_FAILED)
    store.set_attempts(user.username, 0, 0.0)
    store.update_user(user.username, last_login=now)
    store.audit(user.username, AuditAction.LOGIN_OK, role=user.role)
    return user


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise PasswordPolicyError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")


def create_user(store: Store, username: str, password: str, role: str, actor: str | None = None) -> User:
    name = username.strip()
    if not USERNAME_RE.match(name):
        raise PasswordPolicyError("usernames are 2-64 characters: letters, digits and . _ @ - "
                                  "(starting with a letter or digit)")
    _check_role(role)
    user = store.add_user(name, hash_password(password), role)
    store.audit(actor or name, AuditAction.USER_CREATED, user=name, role=role)
    return user


def create_first_admin(store: Store, username: str, password: str) -> User:
    """The first-run set-up: only allowed while the store has no user at all."""
    if store.count_users() > 0:
        raise AuthError("set-up is already done; sign in instead")
    return create_user(store, username, password, "admin")


def ensure_admin_from_env(store: Store) -> User | None:
    """Unattended set-up: create ``MEDAI_ADMIN_USER`` (default ``admin``) with ``MEDAI_ADMIN_PASSWORD``
    when the store has no user yet."""
    password = os.environ.get("MEDAI_ADMIN_PASSWORD")
    if not password or store.count_users() > 0:
        return None
    return create_first_admin(store, os.environ.get("MEDAI_ADMIN_USER", "admin"), password)


def _require_user(store: Store, username: str) -> User:
    user = store.get_user(username)
    if user is None:
        raise MedaiError(f"no user {username!r}")
    return user


def _keep_an_admin(store: Store, user: User) -> None:
    if user.role == "admin" and not user.disabled and store.count_active_admins() <= 1:
        raise MedaiError("this is the last active admin; make another admin first")


def set_role(store: Store, username: str, role: str, actor: str) -> None:
    _check_role(role)
    user = _require_user(store, username)
    if role != "admin":
        _keep_an_admin(store, user)
    store.update_user(user.username, role=role)
    store.audit(actor, AuditAction.ROLE_CHANGED, user=user.username, old=user.role, new=role)


def set_disabled(store: Store, username: str, disabled: bool, actor: str) -> None:
    user = _require_user(store, username)
    if disabled:
        _keep_an_admin(store, user)
    store.update_user(user.username, disabled=int(disabled))
    if disabled:
        store.delete_web_sessions(username=user.username)
    store.audit(actor, AuditAction.USER_DISABLED if disabled else "user_enabled", user=user.username)


def locked_until(store: Store, username: str, now: float | None = None) -> float | None:
    """When the name's sign-in lockout ends, or None when it is not locked."""
    until = store.attempts(username)[1]
    return until if until > (time.time() if now is None else now) else None


def unlock(store: Store, username: str, actor: str) -> None:
    """End a sign-in lockout (and forget the failed attempts) without touching the password."""
    user = _require_user(store, username)
    store.set_attempts(user.username, 0, 0.0)
    store.audit(actor, AuditAction.USER_UNLOCKED, user=user.username)


def reset_password(store: Store, username: str, password: str, actor: str) -> None:
    user = _require_user(store, username)
    store.update_user(user.username, password_hash=hash_password(password))
    store.set_attempts(user.username, 0, 0.0)
    store.audit(actor, AuditAction.PASSWORD_RESET, user=user.username)


# ---- dashboard sessions that survive a reload -------------------------------------------------------------
# The browser keeps a random token in a cookie; the store keeps only its SHA-256 with the user, an absolute
# expiry and the last activity. A reload or a second tab finds the user again; the idle timeout, disabling
# the user and signing out (which deletes the row) still end it.
SESSION_COOKIE = "medai_session"


def start_web_session(store: Store, username: str, policy: AuthPolicy | None = None,
                      now: float | None = None) -> str:
    policy = policy or AuthPolicy.from_env()
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(32)
    store.add_web_session(_token_sha256(token), username, now, now + policy.session_max_age_s)
    return token


def user_for_web_session(store: Store, token: str, policy: AuthPolicy | None = None,
                         now: float | None = None) -> User | None:
    """The session's user while it is valid (not expired, not idle too long, user enabled), else None
    (and an expired or idle session is deleted). Counts as activity."""
    if not isinstance(token, str) or not token or len(token) > 200:
        return None
    policy = policy or AuthPolicy.from_env()
    now = time.time() if now is None else now
    digest = _token_sha256(token)
    row = store.web_session(digest)
    if row is None:
        return None
    if now > row["expires_at"] or now - row["last_seen"] > policy.idle_timeout_s:
        store.delete_web_sessions(digest)
        return None
    user = store.get_user(row["username"])
    if user is None or user.disabled:
        return None
    store.touch_web_session(digest, now)
    return user


def end_web_session(store: Store, token: str | None) -> None:
    if token:
        store.delete_web_sessions(_token_sha256(token))


# ---- API tokens (the HTTP API, medai.api) ------------------------------------------------------------------
# A token is 32 random bytes (URL-safe base64) behind a fixed prefix; it is shown once and only its SHA-256
# is stored. With that much entropy a fast hash is enough (no offline guessing is possible), and lookups
# need no per-token salt. A token acts as its user: the user's current role applies, and disabling the
# user stops the token too.
TOKEN_PREFIX = "medai_"
TOKEN_INVALID = "invalid or revoked API token"


def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_api_token(store: Store, username: str, label: str, actor: str) -> tuple[int, str]:
    """(token id, the token itself). The token is not stored and cannot be shown again."""
    user = _require_user(store, username)
    label = label.strip()
    if not label or len(label) > 64:
        raise PasswordPolicyError("a token needs a label of 1-64 characters (what it is for)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = store.add_token(user.username, label, _token_sha256(token), token[:len(TOKEN_PREFIX) + 4], actor)
    store.audit(actor, AuditAction.TOKEN_CREATED, user=user.username, token_id=token_id, label=label)
    return token_id, token


def revoke_api_token(store: Store, token_id: int, actor: str) -> None:
    if not store.update_token(token_id, revoked_at=time.time()):
        raise MedaiError(f"no API token with id {token_id}")
    store.audit(actor, AuditAction.TOKEN_REVOKED, token_id=token_id)


def user_for_token(store: Store, token: str) -> tuple[User, int]:
    """The token's (enabled) user and the token id, or :class:`AuthError` (one message for every reason)."""
    row = store.token_by_hash(_token_sha256(token)) if token.startswith(TOKEN_PREFIX) else None
    user = store.get_user(row["username"]) if row and row["revoked_at"] is None else None
    if user is None or user.disabled:
        raise AuthError(TOKEN_INVALID)
    store.update_token(row["id"], last_used=time.time())
    return user, int(row["id"])
