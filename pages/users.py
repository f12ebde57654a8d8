"""Users (admin): create, disable, reset passwords, change roles; settings and the audit log."""

from medai.ui.session import require_page
from medai.ui.users import render_users

render_users(require_page("users"))
