"""Analyze: upload X-rays, see findings, heatmaps and anatomy, download the result."""

from medai.ui.analyze import render_analyze
from medai.ui.session import require_page

render_analyze(require_page("analyze"))
