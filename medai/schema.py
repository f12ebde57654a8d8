"""The store's schema as numbered migrations: ``MIGRATIONS[i]`` takes a database from version ``i`` to
``i + 1`` (SQLite ``user_version``). Append, never edit: a database records how far it has come."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: users, login attempts, audit, history, settings
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE COLLATE NOCASE,
        password_hash BLOB NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'researcher', 'radiologist')),
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_login REAL
    );
    CREATE TABLE login_attempts (
        username TEXT PRIMARY KEY COLLATE NOCASE,
        failures INTEGER NOT NULL DEFAULT 0,
        locked_until REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        username TEXT,
        action TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_ts ON audit(ts);
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        username TEXT NOT NULL,
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        file_name TEXT NOT NULL,
        image_sha256 TEXT NOT NULL,
        findings TEXT NOT NULL,
        result TEXT NOT NULL,
        pixels BLOB
    );
    CREATE INDEX history_ts ON history(ts);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: the registry of training jobs started from the dashboard (medai.jobs)
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        run_dir TEXT NOT NULL,
        device TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        registered_as TEXT
    );
    CREATE INDEX runs_state ON runs(state);
    """,
    # 3: API tokens for the HTTP API (medai.api): only a SHA-256 of each token is kept
    """
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL COLLATE NOCASE,
        label TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used REAL,
        revoked_at REAL
    );
    CREATE INDEX api_tokens_user ON api_tokens(username);
    """,
    # 4: dashboard sign-in sessions that survive a page reload (medai.auth web sessions; SHA-256 only)
    """
    CREATE TABLE web_sessions (
        token_sha256 TEXT PRIMARY KEY,
        username TEXT NOT NULL COLLATE NOCASE,
        created_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX web_sessions_user ON web_sessions(username);
    """,
    # 5: the PACS node's durable work queue (medai.pacs.queue): one row per received SOP instance and model
    """
    CREATE TABLE pacs_queue (
        id INTEGER PRIMARY KEY,
        sop_uid TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL,
        modality TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        path TEXT,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL DEFAULT 0,
        lease_until REAL NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        priority REAL NOT NULL DEFAULT 0,
        findings TEXT NOT NULL DEFAULT '[]',
        result TEXT,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (sop_uid, model_sha256)
    );
    CREATE INDEX pacs_queue_state ON pacs_queue(state, next_try);
    CREATE INDEX pacs_queue_study ON pacs_queue(study_uid);
    """,
)
