"""Restoring a backup, and finishing or undoing a restore that a killed process left half done.

A restore verifies the archive, takes a pre-restore backup, extracts into a staging folder, checks the
database, then swaps the folders in (journalled in ``$MEDAI_HOME/.restore-journal.json``) and copies the
database page by page in one transaction. :func:`recover_interrupted` reads the journal at the next start.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from medai import atomic
from medai.audit import AuditAction
from medai.backup import (DB_MEMBER, FOLDERS, MANIFEST, BackupError, Progress, create, exclusive, resolve,
                          verify)
from medai.errors import MedaiError
from medai.paths import medai_home
from medai.store import MIGRATIONS, Store


def _extract(path: Path, manifest: dict[str, Any], staging: Path) -> None:
    """Write the verified members under ``staging`` only (names were checked by :func:`verify`)."""
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.name == MANIFEST:
                continue
            target = (staging / member.name).resolve()
            if staging.resolve() not in target.parents:
                raise BackupError(f"member {member.name!r} would land outside the staging folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)


def _check_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise BackupError(f"the backup's database is unreadable ({exc})") from None
    finally:
        conn.close()
    if result != "ok":
        raise BackupError(f"the backup's database fails its integrity check: {result}")
    if version > len(MIGRATIONS):
        raise BackupError(f"the backup's database has schema {version}, newer than this MedAI; upgrade first")


JOURNAL = ".restore-journal.json"


def _swap_folders(staging: Path, home: Path, old: Path) -> None:
    """Rename each restored folder into place, moving the current one under ``old``; on an error put every
    original back (a kill -9 is undone by :func:`recover_interrupted` from the journal)."""
    old.mkdir()
    try:
        for folder in FOLDERS:
            if (home / folder).exists():
                os.replace(home / folder, old / folder)
            if (staging / folder).exists():
                os.replace(staging / folder, home / folder)
            else:
                (home / folder).mkdir()
    except BaseException:
        _roll_back(old, home)
        raise


def _roll_back(old: Path, home: Path) -> None:
    """Put the folders saved under ``old`` back in place of whatever a restore had moved in."""
    for folder in FOLDERS:
        if (old / folder).exists():
            if (home / folder).exists():
                shutil.rmtree(home / folder)
            os.replace(old / folder, home / folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted() -> str | None:
    """Finish or undo a restore that a killed process left half done, and clear other leftovers of killed
    backups. Called when the dashboard, the API or the CLI starts (cheap when there is nothing to do).
    Returns what was done, which is also written to the audit log (action ``restore_interrupted``)."""
    if not (medai_home() / JOURNAL).exists():
        return None
    try:
        with exclusive("recovery", "medai", wait_s=0) as found:  # its own restore may still be running
            return found
    except BackupError:
        return None


def _database_copied(restore_id: Any) -> bool:
    if not isinstance(restore_id, str):
        return False
    try:
        applied = Store().audit_log(limit=20, action="restore_applied")
    except MedaiError:
        return False
    return any(e["detail"].get("restore_id") == restore_id for e in applied)


def recover_locked() -> str | None:
    home = medai_home()
    journal_path = home / JOURNAL
    if not journal_path.exists():
        return None
    try:
        journal = json.loads(journal_path.read_text())
        old = home / PurePosixPath(str(journal["old"])).name
    except (OSError, ValueError, KeyError, TypeError):
        journal, old = {}, None
    archive, actor = journal.get("archive", "?"), journal.get("actor")
    if journal.get("phase") == "done" or _database_copied(journal.get("restore_id")):
        # the restored database had committed, so the folders were all in place: only clean-up was left
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        message = (f"the restore of {archive} had completed when its process stopped; its clean-up was "
                   "finished now")
    else:
        for candidate in [old] if old is not None else sorted(home.glob(".restore-old-*")):
            if candidate.is_dir():
                _roll_back(candidate, home)
        message = (f"the restore of {archive} was interrupted before it completed; models, configs, results "
                   f"and the database were put back as they were before it"
                   f"{' (also kept in ' + journal['pre_restore'] + ')' if journal.get('pre_restore') else ''}")
    for leftover in home.glob(".restore-staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    journal_path.unlink(missing_ok=True)
    Store().audit(actor, AuditAction.RESTORE_INTERRUPTED, archive=archive, outcome=message)
    return message


def restore(name: str | Path, actor: str, progress: Progress | None = None) -> Path:
    """Restore an archive (audited, in the restored database); returns the automatic pre-restore backup
    taken first."""
    with exclusive("restore", actor):
        safety = _restore(name, actor, progress or (lambda _f, _m: None))
    Store().audit(actor, AuditAction.BACKUP_RESTORED, name=Path(name).name, pre_restore=safety.name)
    return safety


def _restore(name: str | Path, actor: str, progress: Progress) -> Path:
    path = resolve(name)
    progress(0.0, "verifying the archive")
    manifest = verify(path)
    progress(0.2, "taking a pre-restore backup")
    safety = create(actor, label="pre-restore")
    home = medai_home()
    with tempfile.TemporaryDirectory(dir=home, prefix=".restore-staging-") as tmp:
        staging = Path(tmp)
        progress(0.5, "extracting into a staging folder")
        _extract(path, manifest, staging)
        db = staging / DB_MEMBER
        if not db.is_file():
            raise BackupError(f"{path.name} holds no database")
        _check_db(db)
        # a row that arrives in the live database only if the database copy below commits, so that a
        # recovery after kill -9 can tell whether the restore reached its end
        restore_id = uuid.uuid4().hex
        Store(db).audit(actor, AuditAction.RESTORE_APPLIED, archive=path.name, restore_id=restore_id)
        progress(0.8, "swapping in the restored files")
        old = home / f".restore-old-{os.getpid()}-{int(time.time())}"
        journal = {"archive": path.name, "actor": actor, "old": old.name, "pre_restore": safety.name,
                   "restore_id": restore_id,
                   "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "phase": "swap"}
        atomic.write_json(home / JOURNAL, journal)  # from here on a kill -9 is undone at the next start
        try:
            _swap_folders(staging, home, old)  # puts the originals back itself if a rename fails
        except OSError as exc:
            (home / JOURNAL).unlink()
            raise BackupError(f"restore failed and nothing was changed: {exc.strerror or exc}") from None
        try:
            src, dst = sqlite3.connect(db), sqlite3.connect(Store().path)
            try:
                src.backup(dst)  # page by page in one transaction: all or nothing, safe for open connections
            finally:
                dst.close()
                src.close()
        except (OSError, sqlite3.Error) as exc:
            _roll_back(old, home)  # if this fails too, the journal stays and the next start finishes it
            (home / JOURNAL).unlink()
            raise BackupError(f"restore failed and nothing was changed: the database could not be replaced "
                              f"({exc})") from None
        atomic.write_json(home / JOURNAL, {**journal, "phase": "done"})
        shutil.rmtree(old, ignore_errors=True)
        (home / JOURNAL).unlink()
    progress(1.0, "done")
    return safety
