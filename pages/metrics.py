"""Metrics: per-class performance, curves, calibration and model comparison."""

from medai.ui.metrics import render_metrics
from medai.ui.session import require_page

render_metrics(require_page("metrics"))
