"""The Models page: the checkpoints this installation serves and their model cards."""

from __future__ import annotations

import streamlit as st

from medai.ui.widgets import available_models, model_label


def render_models_page() -> None:
    st.title("Models")
    entries = available_models("No models yet. Train one with `python -m medai train --config "
                               "configs/<recipe>.yaml`.")
    if not entries:
        return
    st.dataframe([e.row() for e in entries], hide_index=True)
    entry = st.selectbox("Model card", entries, format_func=model_label)
    card_md = entry.path.with_suffix(".md")
    if card_md.is_file():
        st.markdown(card_md.read_text(encoding="utf-8"))
    with st.expander("Card as stored in the checkpoint (JSON)"):
        st.json(entry.card, expanded=False)
