"""Models: the checkpoints this installation serves, with their model cards."""

from medai.ui.models_panel import render_models_page
from medai.ui.session import require_page

require_page("models")
render_models_page()
