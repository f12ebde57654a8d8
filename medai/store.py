"""The SQLite store: users, login attempts, analysis history, audit log and settings.

One database file (``$MEDAI_HOME/data/medai.db`` unless ``MEDAI_DB`` says otherwise) in WAL mode, so the
dashboard's sessions, the CLI and background jobs can read while one of them writes. The schema is
versioned: :data:`MIGRATIONS` are applied in order, each in its own transaction, and ``PRAGMA
user_version`` records how far a database has got. Nothing here stores a password or image pixels unless
the caller passes them on purpose (pixels only when the admin setting ``store_pixels`` is on).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medai.errors import MedaiError
from medai.schema import MIGRATIONS
from medai.paths import medai_home


class StoreError(MedaiError):
    """The database cannot be opened or is from a newer version of MedAI."""


DEFAULT_SETTINGS: dict[str, Any] = {"store_pixels": False, "pacs": {}}  # pacs: medai.pacs.settings


def local_time(ts: float | None, seconds: bool = False) -> str:
    """A stored timestamp as the server's local time for people ("never" for none)."""
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "never"


def db_path() -> Path:
    return Path(os.environ.get("MEDAI_DB", medai_home() / "data" / "medai.db")).expanduser()


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    disabled: bool
    created_at: float
    last_login: float | None


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    ts: float
    username: str
    model: str
    model_sha256: str
    file_name: str
    image_sha256: str
    findings: list[str]
    result: dict[str, Any]
    has_pixels: bool


class Store:
    """Access to the database; cheap to create (one connection per operation)."""

    def __init__(self, path: str | os.PathLike | None = None, busy_timeout: float = 30.0):
        self.path = Path(path) if path else db_path()
        self.busy_timeout = busy_timeout  # seconds to wait for another writer before giving up
        self._migrated = False

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction: committed on success, rolled back on error, always closed."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            if not self._migrated:
                self._migrate(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(f"the database is busy: another program has held it locked for more than "
                                 f"{self.busy_timeout:g} s, so nothing was written; try again ({exc})") from None
            raise StoreError(f"the database {self.path} cannot be used: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"the database {self.path} is damaged or not a MedAI database ({exc}); "
                             "restore a backup (python -m medai backup restore)") from None
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"the database {self.path} has schema version {version}, newer than this MedAI "
                             f"({len(MIGRATIONS)}); upgrade MedAI or restore an older backup")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._migrated = True

    def schema_version(self) -> int:
        with self.connect() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    # ---- users -------------------------------------------------------------------------------
    def count_users(self) -> int:
        with self.connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def add_user(self, username: str, password_hash: bytes, role: str) -> User:
        now = time.time()
        with self.connect() as conn:
            try:
                conn.execute("INSERT INTO users (username, password_hash, role, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?)", (username, password_hash, role, now, now))
            except sqlite3.IntegrityError:
                raise MedaiError(f"user {username!r} already exists") from None
        return self.get_user(username)  # type: ignore[return-value]

    def get_user(self, username: str) -> User | None:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
        return _user(row) if row else None

    def password_hash(self, username: str) -> bytes | None:
        with self.connect() as conn:
            row = conn.execute("SELECT password_hash FROM users WHERE username = ?", (username,)).fetchone()
        return bytes(row[0]) if row else None

    def list_users(self) -> list[User]:
        with self.connect() as conn:
            return [_user(r) for r in conn.execute("SELECT * FROM users ORDER BY username")]

    def update_user(self, username: str, **fields: Any) -> None:
        allowed = {"password_hash", "role", "disabled", "last_login"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as conn:
            cur = conn.execute(f"UPDATE users SET {assignments}, updated_at = ? WHERE username = ?",
                               (*fields.values(), time.time(), username))
            if cur.rowcount == 0:
                raise MedaiError(f"no user {username!r}")

    def count_active_admins(self) -> int:
        with self.connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0").fetchone()[0]

    # ---- login attempts ----------------------------------------------------------------------
    def attempts(self, username: str) -> tuple[int, float]:
        with self.connect() as conn:
            row = conn.execute("SELECT failures, locked_until FROM login_attempts WHERE username = ?",
                               (username,)).fetchone()
        return (row[0], row[1]) if row else (0, 0.0)

    def set_attempts(self, username: str, failures: int, locked_until: float) -> None:
        with self.connect() as conn:
            conn.execute("INSERT INTO login_attempts (username, failures, locked_until) VALUES (?, ?, ?) "
                         "ON CONFLICT(username) DO UPDATE SET failures = excluded.failures, "
                         "locked_until = excluded.locked_until", (username, failures, locked_until))

    # ---- audit ---------------------------------------------------------------------------------
    def audit(self, username: str | None, action: str, **detail: Any) -> None:
        """One audit row; ``action`` must be an :class:`medai.audit.AuditAction` (or its value)."""
        from medai.audit import AuditAction

        try:
            action = AuditAction(action).value
        except ValueError:
            raise ValueError(f"unknown audit action {action!r}; add it to medai.audit.AuditAction") from None
        with self.connect() as conn:
            conn.execute("INSERT INTO audit (ts, username, action, detail) VALUES (?, ?, ?, ?)",
                         (time.time(), username, action, json.dumps(detail, default=str)))

    def audit_log(self, limit: int = 500, action: str | None = None) -> list[dict[str, Any]]:
        query, params = "SELECT * FROM audit", []
        if action:
            query, params = query + " WHERE action = ?", [action]
        with self.connect() as conn:
            rows = conn.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        return [{"ts": r["ts"], "username": r["username"], "action": r["action"],
                 "detail": json.loads(r["detail"])} for r in rows]

    # ---- history -------------------------------------------------------------------------------
    def add_history(self, username: str, model: str, model_sha256: str, file_name: str, image_sha256: str,
                    findings: list[str], result: dict[str, Any], pixels: bytes | None = None) -> int:
        with self.connect() as conn:
            cur = conn.execute(
                "INSERT INTO history (ts, username, model, model_sha256, file_name, image_sha256, findings, "
                "result, pixels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), username, model, model_sha256, file_name, image_sha256, json.dumps(findings),
                 json.dumps(result), pixels))
            return int(cur.lastrowid)

    def history_id_for_instance(self, username: str, model_sha256: str, sop_uid: str) -> int | None:
        """The row ``username`` (the PACS node) wrote for this SOP instance with this model, if any."""
        with self.connect() as conn:
            row = conn.execute("SELECT id FROM history WHERE username = ? AND model_sha256 = ? AND "
                               "json_extract(result, '$.dicom.sop_uid') = ? ORDER BY id LIMIT 1",
                               (username, model_sha256, sop_uid)).fetchone()
        return int(row["id"]) if row else None

    def update_history_result(self, entry_id: int, findings: list[str], result: dict[str, Any]) -> None:
        """Re-decided by the reader (thresholds) or completed (explanation): the stored result follows."""
        with self.connect() as conn:
            conn.execute("UPDATE history SET findings = ?, result = ? WHERE id = ?",
                         (json.dumps(findings), json.dumps(result), entry_id))

    def history(self, username: str | None = None, model: str | None = None, finding: str | None = None,
                since: float | None = None, limit: int = 500) -> list[HistoryEntry]:
        """Newest first. ``model`` and ``finding`` match any part of the name, ignoring case ("densenet"
        finds pneumonia-densenet121, "pneumo" finds PNEUMONIA and Pneumothorax)."""
        clauses, params = [], []
        for clause, value in (("username = ?", username), ("ts >= ?", since)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if model:
            clauses.append("instr(lower(model), lower(?)) > 0")
            params.append(model)
        if finding:
            clauses.append("EXISTS (SELECT 1 FROM json_each(history.findings) WHERE instr(lower(value), lower(?)) > 0)")
            params.append(finding)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.connect() as conn:
            rows = conn.execute("SELECT id, ts, username, model, model_sha256, file_name, image_sha256, "
                                "findings, result, pixels IS NOT NULL AS has_pixels FROM history"
                                f"{where} ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        return [_history(r) for r in rows]

    def history_pixels(self, entry_id: int) -> bytes | None:
        with self.connect() as conn:
            row = conn.execute("SELECT pixels FROM history WHERE id = ?", (entry_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    # ---- training job registry -------------------------------------------------------------
    def add_run(self, run_id: str, username: str, run_dir: str, device: str, state: str) -> None:
        now = time.time()
        with self.connect() as conn:
            conn.execute("INSERT INTO runs (run_id, username, run_dir, device, state, created_at, updated_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (run_id, username, run_dir, device, state, now, now))

    def update_run(self, run_id: str, **fields: Any) -> None:
        allowed = {"state", "pid", "registered_as"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as conn:
            conn.execute(f"UPDATE runs SET {assignments}, updated_at = ? WHERE run_id = ?",
                         (*fields.values(), time.time(), run_id))

    def runs(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        query, params = "SELECT * FROM runs", ()
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            params = states
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(query + " ORDER BY created_at", params)]

    # ---- API tokens ----------------------------------------------------------------------------
    def add_token(self, username: str, label: str, token_sha256: str, prefix: str, created_by: str) -> int:
        with self.connect() as conn:
            cur = conn.execute("INSERT INTO api_tokens (username, label, token_sha256, prefix, created_by, "
                               "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                               (username, label, token_sha256, prefix, created_by, time.time()))
            return int(cur.lastrowid)

    def add_web_session(self, token_sha256: str, username: str, now: float, expires_at: float) -> None:
        with self.connect() as conn:
            conn.execute("INSERT INTO web_sessions (token_sha256, username, created_at, last_seen, expires_at) "
                         "VALUES (?, ?, ?, ?, ?)", (token_sha256, username, now, now, expires_at))

    def web_session(self, token_sha256: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM web_sessions WHERE token_sha256 = ?", (token_sha256,)).fetchone()
        return dict(row) if row else None

    def touch_web_session(self, token_sha256: str, now: float) -> None:
        with self.connect() as conn:
            conn.execute("UPDATE web_sessions SET last_seen = ? WHERE token_sha256 = ?", (now, token_sha256))

    def delete_web_sessions(self, token_sha256: str | None = None, username: str | None = None) -> int:
        """Delete one session (by token hash) or all of a user's."""
        column, value = ("token_sha256", token_sha256) if token_sha256 else ("username", username)
        with self.connect() as conn:
            return conn.execute(f"DELETE FROM web_sessions WHERE {column} = ?", (value,)).rowcount

    def token_by_hash(self, token_sha256: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM api_tokens WHERE token_sha256 = ?", (token_sha256,)).fetchone()
        return dict(row) if row else None

    def tokens(self, username: str | None = None) -> list[dict[str, Any]]:
        """Every token's metadata (never a hash), newest first."""
        query, params = "SELECT id, username, label, prefix, created_by, created_at, last_used, revoked_at " \
                        "FROM api_tokens", ()
        if username:
            query, params = query + " WHERE username = ?", (username,)
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(query + " ORDER BY id DESC", params)]

    def update_token(self, token_id: int, **fields: Any) -> bool:
        allowed = {"last_used", "revoked_at"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as conn:
            cur = conn.execute(f"UPDATE api_tokens SET {assignments} WHERE id = ?", (*fields.values(), token_id))
            return cur.rowcount > 0

    # ---- settings ------------------------------------------------------------------------------
    def get_setting(self, key: str) -> Any:
        with self.connect() as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else DEFAULT_SETTINGS.get(key)

    def set_setting(self, key: str, value: Any) -> None:
        if key not in DEFAULT_SETTINGS:
            raise MedaiError(f"unknown setting {key!r}; known: {', '.join(DEFAULT_SETTINGS)}")
        with self.connect() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                         "value = excluded.value", (key, json.dumps(value)))


def _user(row: sqlite3.Row) -> User:
    return User(id=row["id"], username=row["username"], role=row["role"], disabled=bool(row["disabled"]),
                created_at=row["created_at"], last_login=row["last_login"])


def _history(row: sqlite3.Row) -> HistoryEntry:
    return HistoryEntry(id=row["id"], ts=row["ts"], username=row["username"], model=row["model"],
                        model_sha256=row["model_sha256"], file_name=row["file_name"],
                        image_sha256=row["image_sha256"], findings=json.loads(row["findings"]),
                        result=json.loads(row["result"]), has_pixels=bool(row["has_pixels"]))
