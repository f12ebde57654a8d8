"""The node's PACS endpoints, set by admins (the PACS page) or on the command line.

The endpoints live in the store's ``pacs`` setting. The DICOMweb password does not: it is kept in
``$MEDAI_HOME/data/pacs-credentials.json`` (mode 0600), a folder backups do not hold, so it is never in a
backup, never shown back (the page says only whether one is set) and never logged or audited.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medai.atomic import atomic_path
from medai.audit import AuditAction
from medai.errors import ConfigError
from medai.paths import medai_home
from medai.store import Store

DEFAULTS: dict[str, Any] = {"ae_title": "MEDAI", "host": "127.0.0.1", "port": 11112, "dest_ae": "", "dest_host": "",
                            "dest_port": 0, "stow_url": "", "dicomweb_url": "", "dicomweb_user": "", "model": None}
PORTS = ("port", "dest_port")


def credentials_path() -> Path:
    return medai_home() / "data" / "pacs-credentials.json"


def load(store: Store | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then the admins' settings, then ``overrides`` (command-line values that are set)."""
    stored = (store or Store()).get_setting("pacs") or {}
    merged = {k: stored.get(k, v) for k, v in DEFAULTS.items()}
    merged.update({k: v for k, v in (overrides or {}).items() if k in DEFAULTS and v not in (None, "")})
    return merged


def validate(values: dict[str, Any]) -> dict[str, Any]:
    clean = {k: values.get(k, DEFAULTS[k]) for k in DEFAULTS if k != "model"}
    for key in PORTS:
        try:
            clean[key] = int(clean[key] or 0)
        except (TypeError, ValueError):
            raise ConfigError(f"PACS setting {key}: {clean[key]!r} is not a port number") from None
        if not 0 <= clean[key] <= 65535 or (key == "port" and clean[key] == 0):
            raise ConfigError(f"PACS setting {key}: {clean[key]} is not a port (1-65535)")
    for key in ("ae_title", "dest_ae"):
        title = str(clean[key]).strip()
        if len(title) > 16 or any(c in title for c in "\\\n\r") or (key == "ae_title" and not title):
            raise ConfigError(f"PACS setting {key}: an AE title is 1-16 characters without backslashes")
        clean[key] = title
    for key in ("stow_url", "dicomweb_url"):
        url = str(clean[key]).strip()
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"PACS setting {key}: {url!r} is not an http(s) URL")
        if "@" in url.split("//", 1)[-1].split("/", 1)[0]:
            raise ConfigError(f"PACS setting {key}: put credentials in the user and password fields, not the URL")
        clean[key] = url
    return clean


def save(admin: str, values: dict[str, Any], password: str | None = None, store: Store | None = None) -> None:
    """Store the endpoints (audited by key, with values; the password only as 'changed')."""
    db = store or Store()
    clean = validate(values)
    db.set_setting("pacs", clean)
    db.audit(admin, AuditAction.SETTING_CHANGED, key="pacs", value={k: v for k, v in clean.items()})
    if password is not None:
        path = credentials_path()
        with atomic_path(path, mode=0o600) as tmp:  # private before the secret is written
            tmp.write_text(json.dumps({"dicomweb_password": password}))
        db.audit(admin, AuditAction.SETTING_CHANGED, key="pacs.dicomweb_password", value="changed")


def password() -> str:
    try:
        return json.loads(credentials_path().read_text()).get("dicomweb_password", "")
    except (OSError, ValueError):
        return ""


def dicomweb_auth(cfg: dict[str, Any]) -> dict[str, str]:
    """Keyword arguments for :func:`medai.pacs.network.client`."""
    return {"username": cfg["dicomweb_user"], "password": password()} if cfg.get("dicomweb_user") else {}
