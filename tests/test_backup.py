"""Backups: round trip, consistency while the app writes, and every fault the issue names."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from medai import auth, backup
from medai.store import Store
from tests.conftest import ROOT

PASSWORD = "correct horse battery"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def installation(medai_home: Path) -> Path:
    """A small real installation: a model file, a config, a run folder and users in the store."""
    (medai_home / "models").mkdir()
    (medai_home / "models" / "demo.safetensors").write_bytes(os.urandom(4096))
    (medai_home / "configs").mkdir()
    (medai_home / "configs" / "demo.yaml").write_text((ROOT / "configs" / "hybrid_pneumonia.yaml").read_text())
    run = medai_home / "results" / "runs" / "demo-run"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"val": {"macro": {"auroc": 0.97}}}))
    (run / "last.pt").write_bytes(os.urandom(2048))  # a resume state: left out unless asked
    auth.create_user(Store(), "admin1", PASSWORD, "admin")
    Store().add_history("admin1", "demo", "ab" * 32, "x.png", "cd" * 32, ["Effusion"], {"results": []})
    return medai_home


def test_round_trip_restores_everything(installation: Path):
    before = {p: _digest(installation / p) for p in ("models/demo.safetensors", "configs/demo.yaml",
                                                      "results/runs/demo-run/eval.json")}
    archive = backup.create("admin1")
    manifest = backup.verify(archive)
    names = {e["path"] for e in manifest["files"]}
    assert "results/runs/demo-run/last.pt" not in names and backup.DB_MEMBER in names
    assert manifest["schema_version"] == Store().schema_version() and manifest["creator"] == "admin1"
    # damage: models and configs gone, a user added, history wiped
    (installation / "models" / "demo.safetensors").unlink()
    (installation / "configs" / "demo.yaml").write_text("changed")
    auth.create_user(Store(), "intruder", PASSWORD, "admin")
    safety = backup.restore(archive.name, "admin1")
    for rel, digest in before.items():
        assert _digest(installation / rel) == digest  # byte-identical
    store = Store()
    assert store.get_user("intruder") is None and store.get_user("admin1").role == "admin"
    assert [e.file_name for e in store.history()] == ["x.png"]
    assert auth.authenticate(store, "admin1", PASSWORD).username == "admin1"
    assert safety.name.endswith("-pre-restore.tar.gz") and backup.verify(safety)
    assert not list(installation.glob(".restore-*"))  # no staging or old folders left behind


def test_backup_is_consistent_while_the_app_writes(installation: Path):
    stop = threading.Event()

    def writer():
        store = Store()
        while not stop.is_set():
            store.audit("admin1", "analysis", note="concurrent")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        archives = [backup.create("admin1", label=f"busy-{i}") for i in range(2)]
    finally:
        stop.set()
        thread.join()
    for archive in archives:
        backup.verify(archive)


def test_kill_9_during_create_leaves_nothing_that_lists_or_verifies(installation: Path):
    (installation / "results" / "big.bin").write_bytes(os.urandom(60 * 2**20))  # ~60 MB: gzip takes a while
    proc = subprocess.Popen([sys.executable, "-m", "medai", "backup", "create"], cwd=ROOT, env=os.environ)
    deadline = time.monotonic() + 60
    while not list((installation / "backups").glob(".*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert backup.list_backups() == []
    for partial in (installation / "backups").glob(".*.partial"):
        with pytest.raises(backup.BackupError):
            backup.verify(partial)


def _rewrite(archive: Path, out: Path, change) -> Path:
    """Copy an archive member by member, letting ``change(name, data)`` alter or add members."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read()
            for name, payload, kind in change(member.name, data):
                info = tarfile.TarInfo(name)
                info.type = kind
                if kind == tarfile.SYMTYPE:
                    info.linkname = "/etc/passwd"
                    dst.addfile(info)
                else:
                    info.size = len(payload)
                    dst.addfile(info, io.BytesIO(payload))
    return out


def test_a_flipped_byte_fails_verify_and_restore_changes_nothing(installation: Path):
    archive = backup.create("admin1")

    def flip(name, data):
        if name == "configs/demo.yaml":
            data = bytes([data[0] ^ 1]) + data[1:]
        yield name, data, tarfile.REGTYPE

    bad = _rewrite(archive, archive.with_name("medai-backup-20000101-000000-bad.tar.gz"), flip)
    with pytest.raises(backup.BackupError, match="checksum"):
        backup.verify(bad)
    (installation / "configs" / "demo.yaml").write_text("current")
    with pytest.raises(backup.BackupError):
        backup.restore(bad.name, "admin1")
    assert (installation / "configs" / "demo.yaml").read_text() == "current"
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # damage the compressed stream itself
    archive.write_bytes(bytes(raw))
    with pytest.raises(backup.BackupError):
        backup.verify(archive)


@pytest.mark.parametrize("evil, kind", [("../escaped.txt", tarfile.REGTYPE), ("/tmp/medai-abs.txt", tarfile.REGTYPE),
                                        ("models/link", tarfile.SYMTYPE)])
def test_unsafe_members_are_refused_and_nothing_is_written(installation: Path, evil: str, kind: bytes):
    archive = backup.create("admin1")

    def add_evil(name, data):
        if name == backup.MANIFEST:
            manifest = json.loads(data)
            manifest["files"].append({"path": evil, "size": 4, "sha256": hashlib.sha256(b"evil").hexdigest()})
            yield evil, b"evil", kind
            yield name, json.dumps(manifest).encode(), tarfile.REGTYPE
        else:
            yield name, data, tarfile.REGTYPE

    bad = _rewrite(archive, archive.with_name("medai-backup-20000101-000000-evil.tar.gz"), add_evil)
    with pytest.raises(backup.BackupError, match="unsafe|not a regular file"):
        backup.verify(bad)
    with pytest.raises(backup.BackupError):
        backup.restore(bad.name, "admin1")
    assert not (installation.parent / "escaped.txt").exists() and not Path("/tmp/medai-abs.txt").exists()
    assert not (installation / "models" / "link").exists()


def test_full_disk_fails_cleanly(installation: Path, monkeypatch: pytest.MonkeyPatch):
    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "add", no_space)
    with pytest.raises(backup.BackupError, match="No space left"):
        backup.create("admin1")
    assert backup.list_backups() == []
    assert [p.name for p in (installation / "backups").glob(".*")] == [".lock"]  # no partial archive left


def test_prune_keeps_the_newest(installation: Path):
    made = []
    for i in range(3):
        made.append(backup.create("admin1", label=f"n{i}"))
        time.sleep(1.1)  # names carry the second
    removed = backup.prune(keep_last=1)
    assert {p.name for p in removed} == {made[0].name, made[1].name}
    assert [i.name for i in backup.list_backups()] == [made[2].name]
    with pytest.raises(backup.BackupError):
        backup.prune()


def test_a_relative_backup_name_cannot_climb_out_of_the_backups_folder(installation: Path, tmp_path: Path):
    archive = backup.create("admin1")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    copy = outside / archive.name
    copy.write_bytes(archive.read_bytes())
    climbing = os.path.relpath(copy, backup.backups_dir())  # ../../elsewhere/medai-....tar.gz
    assert ".." in climbing
    for name in (climbing, f"sub/{archive.name}", f"../{backup.backups_dir().name}/{archive.name}"):
        with pytest.raises(backup.BackupError, match="file name only"):
            backup.resolve(name)
        with pytest.raises(backup.BackupError):
            backup.delete(name)
    assert copy.is_file() and archive.is_file()
    assert backup.resolve(archive.name) == archive and backup.resolve(copy) == copy  # bare name / absolute
