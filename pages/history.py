"""History: past analyses, filtered and re-opened."""

from medai.ui.history import render_history
from medai.ui.session import require_page

render_history(require_page("history"))
