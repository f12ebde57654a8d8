"""PACS: the node's worklist, re-sending results, and (admins) the endpoints."""

from medai.ui.pacs import render_pacs
from medai.ui.session import require_page

render_pacs(require_page("pacs"))
