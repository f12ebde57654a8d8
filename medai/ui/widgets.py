"""Cached resources and charts shared by the pages."""

from __future__ import annotations

import re

import plotly.graph_objects as go
import streamlit as st

from medai.imaging import file_key
from medai.catalog import ModelEntry, list_models
from medai.inference import Predictor


MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#|~$:!])")


def plain(text: object) -> str:
    """Text from outside (file names, DICOM tags, user names, error messages that quote them) made safe
    to put into Streamlit's Markdown: every character that could start emphasis, a link, an image, HTML,
    a directive (``:red[...]``), an emoji short code or LaTeX is backslash-escaped, and line breaks become
    spaces, so it is shown exactly as written."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


@st.cache_resource(max_entries=4, show_spinner="Loading model...")
def _predictor(key: tuple[str, int, int]) -> Predictor:
    return Predictor(key[0])


def cached_predictor(entry: ModelEntry) -> Predictor:
    """One Predictor per checkpoint file for all sessions; a changed file (mtime/size) is loaded again.

    Inference runs under ``torch.inference_mode`` and heatmaps use a private copy of the model, so
    sessions sharing it cannot see each other's hooks or gradients.
    """
    return _predictor(file_key(entry.path))


def available_models(empty_hint: str) -> list[ModelEntry]:
    """The catalogue's models; unreadable checkpoints are shown as warnings, an empty list as a hint."""
    entries, problems = list_models()
    for problem in problems:
        st.warning(problem)
    if not entries:
        st.info(empty_hint)
    return entries


def model_label(entry: ModelEntry) -> str:
    auroc = f", val AUROC {entry.val_auroc:.3f}" if isinstance(entry.val_auroc, float) else ""
    task = entry.card["task"].get("name") or entry.card["task"]["kind"]
    return f"{entry.name} - {task} ({entry.card['architecture']}{auroc})"


def probability_chart(rows: list[dict]) -> go.Figure:
    """Horizontal bars of probabilities, positives coloured, each class's threshold drawn as a tick."""
    rows = rows[::-1]  # plotly draws the first category at the bottom
    names = [r["finding"] for r in rows]
    fig = go.Figure()
    fig.add_bar(x=[r["probability"] for r in rows], y=names, orientation="h", name="probability",
                marker_color=["#c0392b" if r["positive"] else "#7f98a8" for r in rows],
                text=[f"{r['probability']:.2f}" for r in rows], textposition="outside",
                hovertemplate="%{y}: %{x:.3f}<extra></extra>")
    fig.add_scatter(x=[r["threshold"] for r in rows], y=names, mode="markers", name="threshold",
                    marker={"symbol": "line-ns-open", "size": 22, "line": {"width": 3}, "color": "#1d2b36"},
                    hovertemplate="threshold %{x:.3f}<extra></extra>")
    fig.update_layout(xaxis={"range": [0, 1.08], "title": "probability"}, height=max(220, 34 * len(rows) + 90),
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": 1.08},
                      bargap=0.35)
    return fig


def shares_chart(shares: dict[str, float]) -> go.Figure:
    names = {"right_lung": "right lung", "left_lung": "left lung", "heart": "heart",
             "rest_of_body": "rest of body", "outside_body": "outside body"}
    fig = go.Figure(go.Bar(x=[names.get(k, k) for k in shares], y=[100 * v for v in shares.values()],
                           marker_color=["#e05c5c", "#5c9ce0", "#5cc47a", "#b0a070", "#999999"],
                           text=[f"{v:.0%}" for v in shares.values()], textposition="outside"))
    fig.update_layout(yaxis={"title": "% of heatmap", "range": [0, 105]}, height=260,
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig
