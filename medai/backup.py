"""Backups an admin can trust: create, list, verify, prune and restore.

An archive (``$MEDAI_HOME/backups/medai-backup-<stamp>[-label].tar.gz``) holds ``models/``, ``configs/``,
``results/`` (without resume states and decode caches unless asked) and ``store/medai.db`` (a consistent
copy taken with SQLite's online backup API while the app runs), plus ``manifest.json`` listing every
member with its size and SHA-256. It is written under a hidden ``.partial`` name, verified, and only then
renamed, so an interrupted create never leaves an archive that is listed or verifies.

Restore verifies first, refuses unsafe members (absolute paths, ``..``, links, devices, anything not in the
manifest), takes a pre-restore backup, extracts into a staging folder, checks the database's integrity,
then swaps each folder in with renames (rolled back if any step fails) and copies the database in with the
online backup API.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import medai
from medai.audit import AuditAction
from medai.errors import MedaiError
from medai.paths import medai_home
from medai.store import MIGRATIONS, Store

FOLDERS = ("models", "configs", "results")
DB_MEMBER = "store/medai.db"
MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^medai-backup-\d{8}-\d{6}(-[a-z0-9-]+)?\.tar\.gz$")
LARGE_RUN_FILES = ("last.pt",)  # resume states: large, and not needed to use or compare models
Progress = Callable[[float, str], None]


class BackupError(MedaiError):
    """A backup cannot be created, verified or restored; the message says why."""


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    size: int
    created_at: str
    creator: str
    files: int
    label: str

    @property
    def name(self) -> str:
        return self.path.name


def backups_dir() -> Path:
    return medai_home() / "backups"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _collect(include_large: bool) -> list[tuple[str, Path]]:
    home = medai_home()
    members = []
    for folder in FOLDERS:
        root = home / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            if not include_large and (path.name in LARGE_RUN_FILES or "cache" in path.relative_to(home).parts):
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                continue  # someone else's atomic write in progress
            members.append((path.relative_to(home).as_posix(), path))
    return members


def _snapshot_db(target: Path) -> None:
    """A consistent copy of the live store (SQLite online backup: safe while others write)."""
    store = Store()
    store.schema_version()  # creates/migrates it if needed
    src = sqlite3.connect(store.path)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


_held = threading.local()


@contextlib.contextmanager
def exclusive(action: str, actor: str, wait_s: float = 900.0) -> Iterator[str | None]:
    """Serialize backups, restores, deletes and prunes across threads (dashboard sessions) and processes
    (CLI, another dashboard) with an advisory lock on backups/.lock; re-entrant within one thread, so a
    restore can take its own pre-restore backup. Waits up to ``wait_s`` for the holder, then refuses.
    Yields what :func:`_clear_leftovers` found to recover (a message) or None."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield None
        finally:
            _held.depth -= 1
        return
    folder = backups_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".lock", "a+")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise BackupError(f"cannot {action}: the backups folder {folder} is not writable "
                          f"({exc.strerror or exc})") from None
    with fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    raise BackupError(f"cannot {action}: {holder} is still running; try again when it has "
                                      "finished") from None
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"a {action} by {actor} (pid {os.getpid()}, since {dt.datetime.now():%H:%M:%S})")
        fh.flush()
        _held.depth = 1
        try:
            yield _clear_leftovers()
        finally:
            _held.depth = 0
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def create(creator: str, label: str = "", include_large: bool = False, progress: Progress | None = None) -> Path:
    """Write and verify a new archive (audited); returns its path. Nothing is listed unless it is complete."""
    with exclusive("backup", creator):
        path = _create(creator, label, include_large, progress or (lambda _f, _m: None))
    Store().audit(creator, AuditAction.BACKUP_CREATED, name=path.name)
    return path


def _create(creator: str, label: str, include_large: bool, progress: Progress) -> Path:
    out_dir = backups_dir()
    label = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")
    while True:  # one archive per second and label: a second one in the same second waits for the next
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        final = out_dir / f"medai-backup-{stamp}{'-' + label if label else ''}.tar.gz"
        if not final.exists():
            break
        time.sleep(0.25)
    partial = out_dir / f".{final.name}.partial"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".snapshot-") as tmp:
        db_copy = Path(tmp) / "medai.db"
        try:
            progress(0.0, "copying the database")
            try:
                _snapshot_db(db_copy)
            except sqlite3.Error as exc:
                raise BackupError(f"backup failed: the database could not be copied ({exc})") from None
            members = [*_collect(include_large), (DB_MEMBER, db_copy)]
            entries = []
            with tarfile.open(partial, "w:gz", compresslevel=6) as tar:
                for i, (name, path) in enumerate(members):
                    progress(0.05 + 0.8 * i / max(len(members), 1), f"adding {name}")
                    entries.append({"path": name, "size": path.stat().st_size, "sha256": _sha256(path)})
                    tar.add(path, arcname=name, recursive=False)
                manifest = {"format": "medai-backup/1", "app_version": medai.__version__,
                            "schema_version": len(MIGRATIONS), "created_at": dt.datetime.now(
                                dt.timezone.utc).isoformat(timespec="seconds"), "creator": creator,
                            "label": label, "include_large": include_large, "files": entries}
                data = json.dumps(manifest, indent=1).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
            with open(partial, "rb") as fh:
                os.fsync(fh.fileno())
            progress(0.9, "verifying")
            verify(partial)
            os.replace(partial, final)
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise BackupError(f"backup failed and was removed: {exc.strerror or exc}") from None
            raise
    progress(1.0, "done")
    return final


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and not name.startswith("/") \
        and "\\" not in name


MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def read_manifest(path: Path) -> dict[str, Any]:
    """The archive's manifest, checked for shape: a mapping whose ``files`` are {path, size, sha256}."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = tar.getmember(MANIFEST)
            if not member.isreg() or member.size > MAX_MANIFEST_BYTES:
                raise BackupError(f"{path.name}: its manifest is not a regular file of at most 16 MB")
            manifest = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
    except (OSError, tarfile.TarError, KeyError, ValueError, EOFError, zlib.error, RecursionError) as exc:
        raise BackupError(f"{path.name}: not a readable MedAI backup ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("size"), int) and not isinstance(e.get("size"), bool) for e in files):
        raise BackupError(f"{path.name}: the manifest is damaged (it must list files with path, size and sha256)")
    return manifest


def verify(path: str | Path, actor: str | None = None) -> dict[str, Any]:
    """Re-hash every member against the manifest; refuse unexpected, unsafe or missing members. With an
    ``actor`` (someone asked for the check) the outcome is audited."""
    try:
        manifest = _verify(Path(path))
    except BackupError:
        if actor:
            Store().audit(actor, AuditAction.BACKUP_VERIFY_FAILED, name=Path(path).name)
        raise
    if actor:
        Store().audit(actor, AuditAction.BACKUP_VERIFIED, name=Path(path).name)
    return manifest


def _verify(path: Path) -> dict[str, Any]:
    manifest = read_manifest(path)
    expected = {e["path"]: e for e in manifest["files"]}
    seen = set()
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name == MANIFEST:
                    continue
                if not _safe_name(member.name):
                    raise BackupError(f"{path.name}: unsafe member path {member.name!r}")
                if not member.isreg():
                    raise BackupError(f"{path.name}: member {member.name!r} is not a regular file (links and "
                                      "devices are refused)")
                entry = expected.get(member.name)
                if entry is None:
                    raise BackupError(f"{path.name}: member {member.name!r} is not in the manifest")
                h = hashlib.sha256()
                fh = tar.extractfile(member)
                for chunk in iter(lambda: fh.read(1 << 20), b""):  # type: ignore[union-attr]
                    h.update(chunk)
                if h.hexdigest() != entry["sha256"] or member.size != entry["size"]:
                    raise BackupError(f"{path.name}: {member.name} does not match its checksum (damaged)")
                seen.add(member.name)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
        raise BackupError(f"{path.name}: the archive is damaged ({exc})") from None
    missing = set(expected) - seen
    if missing:
        raise BackupError(f"{path.name}: {len(missing)} files of the manifest are missing, e.g. {sorted(missing)[0]}")
    return manifest


def list_backups() -> list[BackupInfo]:
    """Complete archives only (hidden partial files never appear), newest first."""
    out = []
    folder = backups_dir()
    for path in sorted(folder.glob("medai-backup-*.tar.gz"), reverse=True) if folder.is_dir() else []:
        if not NAME_RE.match(path.name):
            continue
        try:
            m = read_manifest(path)
        except BackupError:
            out.append(BackupInfo(path, path.stat().st_size, "?", "?", 0, "unreadable"))
            continue
        out.append(BackupInfo(path, path.stat().st_size, m.get("created_at", "?"), m.get("creator", "?"),
                              len(m.get("files", [])), m.get("label", "")))
    return out


def resolve(name: str | Path) -> Path:
    """An archive by bare name in the backups folder (nothing relative may climb out of it), or by an
    absolute path (the CLI)."""
    path = Path(name)
    if not path.is_absolute():
        if len(path.parts) != 1:
            raise BackupError(f"{str(name)!r}: name a backup by its file name only (see backup list)")
        path = backups_dir() / path
    if not NAME_RE.match(path.name) or not path.is_file():
        raise BackupError(f"no backup named {Path(name).name} in {backups_dir()}")
    return path


def delete(name: str | Path, actor: str = "admin") -> None:
    with exclusive("delete", actor):
        path = resolve(name)
        path.unlink()
    Store().audit(actor, AuditAction.BACKUP_DELETED, name=path.name)


def prune(keep_last: int | None = None, max_age_days: float | None = None, actor: str = "admin") -> list[Path]:
    """Delete archives that no rule keeps: a rule keeps the newest ``keep_last`` and/or those newer than
    ``max_age_days``. Returns the deleted paths."""
    if keep_last is None and max_age_days is None:
        raise BackupError("prune needs keep_last and/or max_age_days")
    with exclusive("prune", actor):
        removed = _prune(keep_last, max_age_days)
    Store().audit(actor, AuditAction.BACKUP_PRUNED, names=[p.name for p in removed])
    return removed


def _prune(keep_last: int | None, max_age_days: float | None) -> list[Path]:
    removed = []
    for i, info in enumerate(list_backups()):
        kept_by_count = keep_last is not None and i < keep_last
        kept_by_age = max_age_days is not None and time.time() - info.path.stat().st_mtime <= max_age_days * 86400
        if not (kept_by_count or kept_by_age):
            info.path.unlink()
            removed.append(info.path)
    return removed


def _clear_leftovers() -> str | None:
    """With the lock held nobody else is writing: partial archives and snapshots are a killed process's
    leftovers, and a restore journal is an interrupted restore."""
    for leftover in [*backups_dir().glob(".*.partial"), *backups_dir().glob(".snapshot-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    from medai.restore import recover_locked

    return recover_locked()


# Restoring lives in medai.restore; it is offered here too, beside the archives it restores.
from medai.restore import JOURNAL, recover_interrupted, restore  # noqa: E402

__all__ = ["BackupError", "BackupInfo", "JOURNAL", "create", "delete", "exclusive", "list_backups", "prune",
           "read_manifest", "recover_interrupted", "resolve", "restore", "verify"]
