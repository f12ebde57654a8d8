"""The Backup page through AppTest: admins create and verify; researchers are refused."""

from __future__ import annotations

from pathlib import Path

from medai import auth, backup
from medai.store import Store
from tests.app.test_dashboard import PASSWORD, app, page_as, sign_in


def test_researcher_cannot_reach_the_backup_page(medai_home: Path):
    auth.create_user(Store(), "res1", PASSWORD, "researcher")
    at = sign_in(app().run(), "res1")
    direct = page_as("backup.py", "res1")
    assert any("does not give access" in e.value for e in direct.error)
    assert not any(b.label == "Create backup" for b in direct.button)
    assert not at.exception


def test_admin_creates_and_verifies_a_backup(medai_home: Path):
    auth.create_user(Store(), "admin1", PASSWORD, "admin")
    at = sign_in(app().run(), "admin1").switch_page("pages/backup.py").run()
    assert at.title[0].value == "Backup" and any("No backups yet" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Create backup").click().run()
    assert not at.exception and any("Created and verified" in s.value for s in at.success)
    [info] = backup.list_backups()
    next(b for b in at.button if b.label == "Verify").click().run()
    assert any(f"{info.name}: all" in s.value for s in at.success)
    actions = [e["action"] for e in Store().audit_log()]
    assert "backup_created" in actions and "backup_verified" in actions


def test_after_a_restore_the_list_shows_the_pre_restore_archive_and_the_tick_is_cleared(medai_home: Path):
    """Was: the backup list missed the pre-restore archive and 'I want to restore' stayed ticked."""
    auth.create_user(Store(), "admin1", PASSWORD, "admin")
    at = page_as("backup.py", "admin1")
    at = next(b for b in at.button if b.label == "Create backup").click().run()
    at = page_as("backup.py", "admin1")
    at.checkbox(key="restore_confirm").check().run()
    at = next(b for b in at.button if b.label == "Restore").click().run()
    assert not at.exception
    assert any(s.value.startswith("Restored ") for s in at.success)
    listed = list(at.dataframe[0].value["backup"])
    assert len(listed) == 2 and {i.name for i in backup.list_backups()} == set(listed)
    assert at.checkbox(key="restore_confirm").value is False
    assert next(b for b in at.button if b.label == "Restore").disabled
