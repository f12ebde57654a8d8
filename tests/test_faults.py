"""Fault injection across the system: kill -9 in the middle of a restore, a database locked by another
writer, a corrupt checkpoint among the models, a full disk under a training run. Afterwards nothing that
was acknowledged is lost, nothing half written looks valid, and the app starts and says what happened.

(kill -9 of a backup, a training job and a job runner, and disk-full backups are in test_backup.py,
test_training.py and test_jobs.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from medai import auth, backup
from medai.catalog import list_models
from medai.store import Store, StoreError
from tests.conftest import ROOT, need, run_cli, tiny_config

PASSWORD = "correct horse battery"


def state(home: Path) -> dict[str, str]:
    """A digest of everything a restore touches: models/, configs/, results/ and the database's users."""
    out = {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
           for folder in backup.FOLDERS for p in sorted((home / folder).rglob("*")) if p.is_file()}
    out["users"] = ",".join(sorted(u.username for u in Store().list_users()))
    return out


@pytest.fixture
def two_states(medai_home: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    """An archive of state A, then the installation changed to state B; returns (archive, A, B)."""
    (medai_home / "models").mkdir()
    (medai_home / "models" / "a.safetensors").write_bytes(os.urandom(300_000))
    (medai_home / "configs").mkdir()
    (medai_home / "configs" / "a.yaml").write_text("name: a\n")
    (medai_home / "results").mkdir()
    auth.create_user(Store(), "admin1", PASSWORD, "admin")
    a = state(medai_home)
    archive = backup.create("admin1", label="state-a").name
    (medai_home / "models" / "a.safetensors").unlink()
    (medai_home / "models" / "b.safetensors").write_bytes(os.urandom(200_000))
    (medai_home / "configs" / "a.yaml").write_text("name: b\n")
    (medai_home / "results" / "note.txt").write_text("made after the backup")
    auth.create_user(Store(), "bob", PASSWORD, "radiologist")
    return archive, a, state(medai_home)


# A restore in a child process that kills itself with SIGKILL at a chosen point: the n-th os.replace
# (the folder swap), or the moment it records that the database copy completed.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from medai import atomic, backup
    where, n = sys.argv[2], int(sys.argv[3])
    calls = {"n": 0}
    if where == "replace":
        real = os.replace
        def replace(src, dst):
            if ".restore-old-" in str(dst) or ".restore-staging-" in str(src):  # the folder swap
                calls["n"] += 1
                if calls["n"] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        backup.os.replace = replace
    else:
        real_write = atomic.write_json
        def write_json(path, obj):
            if obj.get("phase") == "done":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(path, obj)
        atomic.write_json = write_json
    backup.restore(sys.argv[1], "admin1")
""")


@pytest.mark.parametrize("where,n", [("replace", n) for n in range(1, 6)] + [("db_done", 0)])
def test_kill_9_during_restore_is_undone_or_completed_at_the_next_start(two_states, medai_home: Path,
                                                                        where: str, n: int):
    archive, a, b = two_states
    proc = subprocess.run([sys.executable, "-c", KILLER, archive, where, str(n)], cwd=ROOT, env=os.environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (medai_home / backup.JOURNAL).exists()  # the half-done restore is on record
    started = run_cli("backup", "list", check=True)  # any start of MedAI recovers before it reads anything
    assert "recovered after an interruption" in started.stderr
    after = state(medai_home)
    if where == "db_done":  # the database had been replaced: the restore is complete, only clean-up was left
        assert after == a and "had completed" in started.stderr
    else:  # an unacknowledged restore is rolled back entirely: not a mix of A and B
        assert after == b and "put back as they were" in started.stderr
    assert not list(medai_home.glob(".restore-*")) and not (medai_home / backup.JOURNAL).exists()
    event = Store().audit_log(action="restore_interrupted")[0]
    assert event["username"] == "admin1" and archive in json.dumps(event)
    backup.verify(backup.resolve(archive))  # the archive itself is untouched and can be restored again
    backup.restore(archive, "admin1")
    assert state(medai_home) == a


def test_the_dashboard_recovers_and_says_so(two_states, medai_home: Path):
    from streamlit.testing.v1 import AppTest

    archive, _a, b = two_states
    proc = subprocess.run([sys.executable, "-c", KILLER, archive, "replace", "3"], cwd=ROOT, env=os.environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=60).run()
    assert not at.exception
    assert any("Recovered after an interruption" in w.value and "put back" in w.value for w in at.warning)
    assert state(medai_home) == b
    page = AppTest.from_file(str(ROOT / "pages" / "backup.py"), default_timeout=60)  # later, for every admin
    page.session_state["medai_user"] = "admin1"
    page.session_state["medai_last_seen"] = time.time()
    page.run()
    assert any(archive in w.value and "interrupted" in w.value for w in page.warning)


def test_a_restore_failing_on_the_database_changes_nothing(two_states, medai_home: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    archive, _a, b = two_states
    real = sqlite3.connect

    live = str(Store().path)

    class FailingCopy:  # the copy into the live database fails (an I/O error on the disk under it)
        def __init__(self, conn, path):
            self.conn, self.path = conn, str(path)

        def backup(self, target, *args, **kwargs):
            if getattr(target, "path", None) == live:
                raise sqlite3.OperationalError("disk I/O error")
            return self.conn.backup(getattr(target, "conn", target), *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    with monkeypatch.context() as patched:
        patched.setattr(backup.sqlite3, "connect", lambda path, *a, **k: FailingCopy(real(path, *a, **k), path))
        with pytest.raises(backup.BackupError, match="nothing was changed.*database could not be replaced"):
            backup.restore(archive, "admin1")
    assert state(medai_home) == b and not (medai_home / backup.JOURNAL).exists()


def test_two_backups_at_once_are_serialized_and_a_stuck_holder_is_named(medai_home: Path):
    """Another process holds the backup lock: a second admin waits, or after its wait says who holds it."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from medai import backup
        with backup.exclusive("restore", "alice"):
            print("held", flush=True)
            time.sleep(float(sys.argv[1]))
    """), "3"], cwd=ROOT, env=os.environ, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(backup.BackupError, match=r"cannot backup: a restore by alice \(pid \d+"):
            with backup.exclusive("backup", "bob", wait_s=0.5):
                pass
        started = time.monotonic()
        path = backup.create("bob")  # waits for alice, then runs
        assert time.monotonic() - started > 1.0 and backup.verify(path)
    finally:
        holder.kill()
        holder.wait()


def test_a_database_locked_by_another_writer(medai_home: Path):
    """Another program holds a write transaction: short waits succeed once it lets go; a longer one gives a
    clear StoreError and writes nothing."""
    store = Store()
    auth.create_user(store, "admin1", PASSWORD, "admin")
    script = textwrap.dedent("""
        import sqlite3, sys, time
        conn = sqlite3.connect(sys.argv[1], isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
        conn.execute("COMMIT")
    """)
    for hold, patience, succeeds in ((1.0, 10.0, True), (4.0, 0.5, False)):
        locker = subprocess.Popen([sys.executable, "-c", script, str(store.path), str(hold)],
                                  stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        patient = Store(busy_timeout=patience)
        before = len(patient.audit_log()) if succeeds else None
        if succeeds:
            patient.audit("admin1", "analysis", note="waited")
            assert len(patient.audit_log()) == before + 1
        else:
            with pytest.raises(StoreError, match="database is busy.*nothing was written"):
                patient.audit("admin1", "analysis", note="gave up")
        locker.wait(timeout=30)
    assert [e["detail"].get("note") for e in Store().audit_log(action="analysis")] == ["waited"]
    assert auth.authenticate(Store(), "admin1", PASSWORD).username == "admin1"  # nothing damaged


def test_a_corrupt_database_file_is_explained(medai_home: Path):
    store = Store()
    auth.create_user(store, "admin1", PASSWORD, "admin")
    store.path.write_bytes(b"this is not sqlite" * 100)
    for wal in store.path.parent.glob("*-wal"):
        wal.unlink()
    with pytest.raises(StoreError, match="damaged or not a MedAI database.*restore a backup"):
        Store().get_user("admin1")


def test_a_corrupt_checkpoint_is_listed_as_a_problem_and_the_others_still_serve(medai_home: Path):
    from streamlit.testing.v1 import AppTest

    shipped = ROOT / "models" / "pneumonia-hybrid.safetensors"
    (medai_home / "models").mkdir()
    (medai_home / "models" / "truncated.safetensors").write_bytes(shipped.read_bytes()[: 50_000])
    (medai_home / "models" / "garbage.safetensors").write_bytes(os.urandom(4096))
    entries, problems = list_models()
    assert {e.name for e in entries} >= {"pneumonia-hybrid", "pneumonia-densenet121"}
    assert len(problems) == 2 and all("truncated.safetensors" in p or "garbage.safetensors" in p for p in problems)
    auth.create_user(Store(), "admin1", PASSWORD, "admin")
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=120).run()
    at.text_input[0].set_value("admin1")
    at.text_input[1].set_value(PASSWORD)
    at.button[0].click().run()
    assert not at.exception
    shown = " ".join(str(x.value) for x in [*at.warning, *at.error, *at.caption, *at.markdown])
    assert "garbage.safetensors" in shown or "truncated.safetensors" in shown


def test_disk_full_under_a_training_run_fails_cleanly_and_resumes(tmp_path: Path, medai_home: Path):
    """The run's files may not grow past 400 KB (RLIMIT_FSIZE, as on a full disk): the run stops with a
    clear error, no half-written checkpoint is left that looks valid, and once there is space it resumes."""
    need("pneumoniamnist/pneumoniamnist_balanced_28.npz")
    config = tiny_config(tmp_path, "pneumoniamnist/pneumoniamnist_balanced_28.npz",
                         data={"max_samples": 256}, train={"epochs": 2})

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    proc = subprocess.run([sys.executable, "-m", "medai", "train", "--config", str(config)], cwd=ROOT,
                          env=os.environ, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "File too large" in proc.stderr or "No space" in proc.stderr or "space" in proc.stderr
    runs = sorted((medai_home / "results" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))  # no temporary file left
    from medai.models.checkpoint import read_card
    if (run / "best.safetensors").exists():  # whatever exists is complete: it loads
        read_card(run / "best.safetensors")
    if (run / "last.pt").exists():
        torch.load(run / "last.pt", weights_only=False)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] in ("failed", "interrupted") and status.get("error")
    resumed = run_cli("train", "--resume", str(run), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_a_read_only_results_folder_is_explained(tmp_path: Path, medai_home: Path):
    """results/ is read-only (a read-only mount; as a non-root user, permission bits do): training refuses
    with a message naming the folder, not a traceback, and leaves nothing behind."""
    need("pneumoniamnist/pneumoniamnist_balanced_28.npz")
    runs = medai_home / "results" / "runs"
    runs.mkdir(parents=True)
    config = tiny_config(tmp_path, "pneumoniamnist/pneumoniamnist_balanced_28.npz", data={"max_samples": 64})
    mounted = False
    if os.geteuid() == 0:  # root writes through permission bits: make it a read-only bind mount instead
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(runs), str(runs)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"running as root without the right to mount a read-only folder: {done.stderr.strip()}")
        mounted = True
    else:
        runs.chmod(0o555)
    try:
        proc = run_cli("train", "--config", str(config), timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert f"cannot create the run folder {runs}" in proc.stderr and "must be writable" in proc.stderr
        assert list(runs.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(runs)], check=True)
        else:
            runs.chmod(0o755)


def test_atomic_writes_respect_the_umask_and_keep_an_existing_files_mode(tmp_path: Path):
    from medai.atomic import write_text

    old = os.umask(0o022)
    try:
        fresh = tmp_path / "model.md"
        write_text(fresh, "card")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600
        private = tmp_path / "secret.json"
        private.write_text("{}")
        private.chmod(0o600)
        write_text(private, '{"a": 1}')
        assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text() == '{"a": 1}'
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        # a secret asks for 0600 and has it while it is written, not only after
        from medai.atomic import atomic_path

        with atomic_path(tmp_path / "credentials.json", mode=0o600) as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
            tmp.write_text("pw")
        assert stat.S_IMODE((tmp_path / "credentials.json").stat().st_mode) == 0o600
        # safetensors replaces the temporary file with one of its own (0600): a checkpoint still gets 0644
        from medai.models import create_model
        from medai.models.checkpoint import new_card, save_checkpoint

        weights = tmp_path / "model.safetensors"
        save_checkpoint(create_model("resnet18", 2), new_card("resnet18", {}, "multiclass", ["a", "b"], {}), weights)
        assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    finally:
        os.umask(old)
