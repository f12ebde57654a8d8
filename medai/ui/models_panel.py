"""A table of the checkpoints available to this installation."""

from __future__ import annotations

import streamlit as st

from medai.errors import MedaiError
from medai.models.checkpoint import read_card
from medai.paths import SHIPPED_MODELS_DIR, medai_home


def render_models_panel() -> None:
    folders = {SHIPPED_MODELS_DIR, medai_home() / "models"}
    paths = sorted({p for f in folders if f.is_dir() for p in f.glob("*.safetensors")})
    if not paths:
        st.info("No models yet. Train one with `python -m medai train --config configs/<recipe>.yaml`.")
        return
    rows = []
    for path in paths:
        try:
            card = read_card(path)
        except MedaiError as exc:
            st.warning(str(exc))
            continue
        auroc = card.get("metrics", {}).get("val", {}).get("macro", {}).get("auroc")
        rows.append({"model": path.stem, "architecture": card["architecture"], "task": card["task"]["kind"],
                     "labels": ", ".join(card["labels"]), "val AUROC": auroc})
    st.dataframe(rows, hide_index=True)
