"""The History page: past analyses (admins see everyone's), filters, and re-opening one result."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import streamlit as st

from medai.analysis import analyze_and_explain, overlay
from medai.catalog import ModelEntry, list_models
from medai.data.io import decode_image
from medai.store import Store, User, local_time
from medai.ui import viewer
from medai.ui.widgets import cached_predictor, plain, probability_chart


def _model_for(entry) -> ModelEntry | None:
    """The catalogue's model that made the entry: same name and the same file (sha256)."""
    entries, _problems = list_models()
    for candidate in entries:
        if candidate.name == entry.model:
            return candidate if cached_predictor(candidate).ckpt.sha256 == entry.model_sha256 else None
    return None


def _image_and_heatmap(entry, pixels: bytes) -> None:
    """The stored image in the viewer and, when the model that made the result is still installed, the
    heatmap of a finding beside it, recomputed from the stored pixels (the same model file: the same map,
    up to 8-bit storage)."""
    image = decode_image(pixels, name=entry.file_name)
    view_key = f"history-{entry.id}"
    size = (image.meta.width, image.meta.height)
    stored = np.round(image.pixels * 255).astype(np.uint8)

    def show(*heatmap: tuple[str, np.ndarray]) -> None:
        viewer.show([("Stored image", stored), *heatmap], size, view_key, "stored image")

    model = _model_for(entry)
    findings = [r["finding"] for r in entry.result.get("results", [])]
    if model is None or not findings:
        show()
        if model is None:
            st.caption(f"No heatmap: the model {plain(entry.model)} with sha256 {entry.model_sha256[:12]} is no "
                       "longer installed.")
        return
    positives = [r["finding"] for r in entry.result["results"] if r.get("positive")]
    finding = st.selectbox("Heatmap of", ["none (image only)", *findings],
                           index=1 + findings.index(positives[0]) if positives else 0, key=f"history_heat_{entry.id}")
    if finding not in findings:
        show()
        return
    with st.spinner(f"Heatmap for {finding}..."):
        analysis, exp = analyze_and_explain(cached_predictor(model), model.name, pixels, entry.file_name, [finding])
    if exp is None:  # the stored 8-bit image is refused by today's input gate
        show()
        st.caption(f"No heatmap: {plain(analysis.verdict.reason)}.")
        return
    caption = f"{exp.method} heatmap for {finding} (recomputed from the stored image)"
    show((caption, overlay(analysis.image.pixels, exp, finding)))
    st.caption(caption)


def render_history(user: User) -> None:
    st.title("History")
    db = Store()
    c1, c2, c3, c4 = st.columns(4)
    everyone = user.role == "admin"
    who = c1.text_input("User", value="" if everyone else user.username, disabled=not everyone,
                        help=None if everyone else "You see your own analyses; admins see everyone's.")
    model = c2.text_input("Model", help="any part of the name, e.g. densenet")
    finding = c3.text_input("Finding", help="any part of the name, e.g. pneumo")
    days = c4.number_input("Last days", min_value=1, max_value=3650, value=30)
    since = dt.datetime.now().timestamp() - days * 86400
    entries = db.history(username=(who.strip() or None) if everyone else user.username,
                         model=model.strip() or None, finding=finding.strip() or None, since=since)
    if not entries:
        st.info("No analyses match these filters.")
        return
    rows = [{"id": e.id, "time": local_time(e.ts, seconds=True), "user": e.username, "model": e.model, "file": e.file_name,
             "findings": "REFUSED (not analysed)" if e.result.get("status") == "refused" else
             ", ".join(e.findings) or "none", "image sha256": e.image_sha256[:12]} for e in entries]
    event = st.dataframe(rows, hide_index=True, on_select="rerun", selection_mode="single-row", key="history_table")
    chosen = event.selection.rows if event and event.selection else []
    ids = [e.id for e in entries]
    pick = st.selectbox("Open analysis", ids, index=chosen[0] if chosen else 0,
                        format_func=lambda i: next(f"#{r['id']} {r['time']} {r['file']}" for r in rows if r["id"] == i))
    entry = entries[ids.index(pick)]
    st.subheader(f"#{entry.id}: {plain(entry.file_name)}")
    st.caption(f"{local_time(entry.ts, seconds=True)} by {plain(entry.username)} with {plain(entry.model)} "
               f"(model sha256 {entry.model_sha256[:12]})")
    if entry.result.get("status") == "refused":
        st.error(plain(entry.result.get("refusal", "Refused by the input gate.")), icon=":material/block:")
    changed = {k: v for k, v in entry.result.get("thresholds", {}).items()
               if isinstance(v, dict) and v.get("source") == "reader"}
    if changed:
        st.caption("Decided at the reader's thresholds: " + ", ".join(
            f"{plain(k)} {v['value']:.2f} (model {v['model']:.2f})" for k, v in changed.items()))
    pixels = db.history_pixels(entry.id) if entry.has_pixels else None
    if pixels:
        _image_and_heatmap(entry, pixels)
    else:
        st.info("Image pixels are not stored (the admin setting keeps only hashes and results).")
    if entry.result.get("results"):
        st.plotly_chart(probability_chart(entry.result["results"]), key="history_chart")
    st.download_button("Result JSON", json.dumps(entry.result, indent=2), f"analysis_{entry.id}.json",
                       "application/json", on_click="ignore")
