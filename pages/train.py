"""Train: launch, watch, cancel and resume training runs (researchers and admins)."""

from medai.ui.session import require_page
from medai.ui.train import render_train

render_train(require_page("train"))
