"""Backup (admin): create, verify, download, restore and prune backups; diagnostics."""

from medai.ui.backup import render_backup
from medai.ui.session import require_page

render_backup(require_page("backup"))
