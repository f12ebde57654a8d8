"""MedAI CXR dashboard entry point (the pages arrive with the dashboard issue)."""

import streamlit as st

from medai.ui.models_panel import render_models_panel

st.set_page_config(page_title="MedAI CXR", page_icon=":material/radiology:", layout="wide")
st.title("MedAI CXR")
st.caption("Decision support for chest X-rays, not a diagnosis.")
render_models_panel()
