"""The Analyze page: upload, predict, threshold, explain, download; every analysis goes to History."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import streamlit as st

from medai.analysis import (DISCLAIMER, HEATMAP_METHODS, REPORT_HEATMAPS, Analysis, Explanation,
                            analyze_and_explain, analyze_bytes, decide, default_method, display_film, explain_image,
                            overlay, record, refusal_message, report_pdf, result_dict, to_png, update_record)
from medai.catalog import ModelEntry, default_index
from medai.errors import MedaiError
from medai.ui import viewer
from medai.ui.pacs import OPEN_KEY as PACS_OPEN_KEY
from medai.ui.widgets import (available_models, cached_predictor, model_label, plain, probability_chart,
                              shares_chart)

if TYPE_CHECKING:
    from medai.inference import Predictor
    from medai.store import User

TASK_TITLES = {"chest": "Chest X-ray", "brain": "Brain MRI"}
UPLOAD_TITLES = {"Chest X-ray": "Chest X-rays", "Brain MRI": "Brain MRI slices"}


def _task_of(entry: ModelEntry) -> str:
    task = entry.card["task"]
    return TASK_TITLES.get(str(task.get("body_part") or "").lower(), task.get("name") or task["kind"])


def _pick_model(entries: list[ModelEntry]) -> tuple[str, ModelEntry]:
    """Task first, then a model of that task: a brain MRI model is never offered for chest films."""
    tasks = list(dict.fromkeys(_task_of(e) for e in entries))
    task = _task_of(entries[default_index(entries)])
    if len(tasks) > 1:
        task = st.sidebar.selectbox("Task", tasks, index=tasks.index(task), key="analyze_task")
    group = [e for e in entries if _task_of(e) == task]
    return task, st.sidebar.selectbox("Model", group, index=default_index(group), format_func=model_label,
                                      key=f"analyze_model_{task}")


EXPENSIVE_METHODS = {"scorecam": "Score-CAM runs the model once per feature map of its target layer (hundreds to "
                                  "over a thousand forward passes): about 1-4 minutes per finding on this server"}


def _method_key(predictor: Predictor, image_sha256: str) -> str:
    """The method choice belongs to one image and one model: a slow method chosen once never carries over."""
    return f"heat_method_{predictor.ckpt.sha256[:16]}_{image_sha256[:16]}"


def _heatmap_method(predictor: Predictor, image_sha256: str) -> str:
    chosen = st.session_state.get(_method_key(predictor, image_sha256))
    return chosen if chosen and chosen not in EXPENSIVE_METHODS else default_method(predictor)


def _first_heatmap(labels: list[str], thresholds: dict[str, float]) -> Callable[[list[float]], list[str]]:
    """The finding the heatmap panel will show first, from the probabilities: the one still selected, or
    the top row of the findings table."""
    def pick(probabilities: list[float]) -> list[str]:
        chosen = st.session_state.get("heat_finding")
        return [chosen if chosen in labels else decide(labels, probabilities, thresholds)[0]["finding"]]
    return pick


def _analyses(user: User, entry: ModelEntry, predictor: Predictor, uploads: list,
              thresholds: dict[str, float]) -> list[Analysis]:
    """Analyze each upload once per model (kept in the session, by content and name, so the same file
    uploaded again is neither analysed nor saved to History twice); errors are shown per file. The first
    upload's prediction comes from the forward pass of the heatmap the page shows first (one pass, not two);
    the rest are predicted only, and explained when selected."""
    cache: dict[tuple[str, str, str], Analysis | str] = st.session_state.setdefault("analyses", {})
    out = []
    for i, upload in enumerate(uploads):
        data = upload.getvalue()
        key = (predictor.ckpt.sha256, hashlib.sha256(data).hexdigest(), upload.name)
        if key not in cache:
            try:
                if i == 0:
                    method = _heatmap_method(predictor, hashlib.sha256(data).hexdigest())
                    analysis, exp = analyze_and_explain(predictor, entry.name, data, upload.name,
                                                        _first_heatmap(predictor.labels, thresholds), method)
                    if exp is not None:
                        _explanations()[_explanation_key(predictor, analysis, next(iter(exp.heatmaps)), method)] = exp
                else:
                    analysis = analyze_bytes(predictor, entry.name, data, upload.name)
                cache[key] = analysis
                _record(user, analysis, predictor, thresholds)
            except MedaiError as exc:
                cache[key] = str(exc)
        if isinstance(cache[key], str):
            st.error(plain(cache[key]), icon=":material/error:")  # quotes the upload's file name
        else:
            out.append(cache[key])
    return out


def _record(user: User, analysis: Analysis, predictor: Predictor, thresholds: dict[str, float]) -> None:
    """History row and audit entry at the thresholds the reader sees: hashes, model and findings (or the
    refusal); pixels only if the admin allows it."""
    entry_id, result = record(user.username, analysis, predictor.ckpt.card, thresholds)
    _history_ids()[_analysis_key(analysis)] = (entry_id, _signature(result), None)


def _history_ids() -> dict[tuple, tuple[int, str, dict | None]]:
    """Per analysis of this session: its History row, what was last stored (signature) and the stored
    explanation summary (kept when the analysis is later re-decided from the batch table)."""
    return st.session_state.setdefault("history_ids", {})


def _analysis_key(analysis: Analysis) -> tuple:
    return analysis.model_sha256, analysis.image_sha256, analysis.file_name


def _signature(result: dict[str, Any]) -> str:
    explained = bool(result.get("explanation"))
    return json.dumps([result["findings"], result["thresholds"], explained], sort_keys=True)


def _sync_history(user: User, analysis: Analysis, result: dict[str, Any]) -> None:
    """What the reader sees is what History keeps: a changed threshold re-decides the stored entry (and
    the first heatmap view adds the explanation summary: CTR with its caveat, attention shares)."""
    known = _history_ids().get(_analysis_key(analysis))
    if known is None:
        return
    entry_id, stored, explanation = known
    if not result.get("explanation") and explanation:  # re-decided from the table: keep what was explained
        result = {**result, "explanation": explanation}
    if stored == _signature(result):
        return
    update_record(user.username, entry_id, analysis, result)
    _history_ids()[_analysis_key(analysis)] = (entry_id, _signature(result), result.get("explanation"))


def _thresholds(predictor: Predictor) -> dict[str, float]:
    """Per-finding thresholds (a negative class such as NORMAL has none), starting at the model's operating
    points; sliders re-decide live, and a changed one says so with the model's value beside it."""
    defaults = dict(predictor.thresholds)
    with st.sidebar.expander("Decision thresholds", icon=":material/tune:"):
        if st.button("Reset to the model's operating points"):
            for label in defaults:
                st.session_state.pop(f"thr_{predictor.ckpt.sha256}_{label}", None)
        out = {}
        for label, model_value in defaults.items():
            key = f"thr_{predictor.ckpt.sha256}_{label}"
            changed = key in st.session_state and abs(st.session_state[key] - model_value) > 1e-9
            out[label] = st.slider(f"{label} (changed; model: {model_value:.2f})" if changed else label, 0.0, 1.0,
                                   value=float(model_value), step=0.01, key=key)
        return out


def _select(analyses: list[Analysis], thresholds: dict[str, float]) -> Analysis:
    if len(analyses) == 1:
        return analyses[0]
    rows = []
    for a in analyses:  # "top finding": the most probable finding (a negative class such as NORMAL is none)
        decided = [] if a.refused else decide(a.labels, a.prediction.probabilities, thresholds)
        top = max(decided, key=lambda r: r["probability"], default=None)
        rows.append({"file": a.file_name, "findings": f"REFUSED: {a.verdict.reason}" if a.refused else
                     ", ".join(r["finding"] for r in decided if r["positive"]) or "none",
                     "top finding": f"{top['finding']} {top['probability']:.2f}" if top else None})
    st.subheader(f"{len(analyses)} images")
    # keyed by the upload set: a selection made in another set (files since removed) is never reused
    upload_set = hashlib.sha256("|".join(f"{a.image_sha256}:{a.file_name}" for a in analyses).encode()).hexdigest()
    event = st.dataframe(rows, hide_index=True, on_select="rerun", selection_mode="single-row",
                         key=f"batch_table_{upload_set[:16]}")
    chosen = [i for i in (event.selection.rows if event and event.selection else []) if 0 <= i < len(analyses)]
    return analyses[chosen[0] if chosen else 0]


def _film(analysis: Analysis) -> tuple[np.ndarray, np.ndarray]:
    """The image facts, the window/level controls and the film as the reader windows it: uint8 at full
    resolution (the viewer's first pane) and [0, 1] at display size (what heatmaps are drawn on)."""
    meta = analysis.image.meta
    details = [meta.source_format.upper(), f"{meta.width} x {meta.height}"]
    details += [v for v in (meta.modality, meta.body_part, meta.view) if v]
    st.caption(plain(" | ".join(details)))
    for note in meta.extra.get("warnings", []):  # e.g. a malformed DICOM window the decoder had to skip
        st.warning(f"DICOM: {plain(note)}; the image is shown min-max scaled instead.", icon=":material/tune:")
    scale, win, invert = viewer.window_controls(analysis.image, analysis.image_sha256[:16])
    full = scale.window_u8(win, invert)
    return full, display_film(full)


def _study_panel(analysis: Analysis) -> None:
    """The DICOM's patient and study fields, for the signed-in reader (never logged or stored)."""
    if analysis.image.study:
        with st.expander("Patient and study (from the DICOM)", icon=":material/badge:"):
            st.table({k: plain(v) for k, v in analysis.image.study.items()})


def _show_viewer(analysis: Analysis, full: np.ndarray, panes: list[tuple[str, np.ndarray]]) -> None:
    film = viewer.full_resolution(full)
    scaled = f"film sent at {film.shape[1]} x {film.shape[0]}" if film.shape != full.shape else "film at full resolution"
    viewer.show([("Image", film), *panes], (full.shape[1], full.shape[0]), analysis.image_sha256[:16], scaled)


def _findings_panel(rows: list[dict]) -> None:
    positives = [r for r in rows if r["positive"]]
    if positives:
        for r in positives:
            own = f", yours; model {r['model_threshold']:.2f}" if r["threshold_source"] == "reader" else ""
            st.markdown(f"**{r['finding']}**: {r['probability']:.2f} ({r['confidence']}; threshold "
                        f"{r['threshold']:.2f}{own})")
    else:
        st.markdown("No finding above its threshold.")
    st.plotly_chart(probability_chart(rows), key="prob_chart")


def _explanations() -> dict[tuple, Explanation]:
    return st.session_state.setdefault("explanations", {})


def _explanation_key(predictor: Predictor, analysis: Analysis, finding: str, method: str) -> tuple:
    return predictor.ckpt.sha256, analysis.image_sha256, finding, method


def _explanation(predictor: Predictor, analysis: Analysis, finding: str, method: str) -> Explanation:
    cache = _explanations()
    key = _explanation_key(predictor, analysis, finding, method)
    if key not in cache:
        with st.spinner(f"Computing {method} heatmap for {finding}..."):
            cache[key] = explain_image(predictor, analysis.image, [finding], method, analysis.prediction.probabilities)
    return cache[key]


def _confirm_expensive(predictor: Predictor, analysis: Analysis, finding: str, method: str, fallback: str) -> str:
    """A slow method runs only when asked for, after saying what it costs; until then the default is shown."""
    if method not in EXPENSIVE_METHODS or _explanation_key(predictor, analysis, finding, method) in _explanations():
        return method
    st.warning(f"{EXPENSIVE_METHODS[method]}. Showing {fallback} until you start it.", icon=":material/hourglass:")
    if not st.button(f"Compute {method} for {finding}", key=f"run_{method}_{analysis.image_sha256[:16]}"):
        return fallback
    with st.status(f"Computing {method} for {finding} ({EXPENSIVE_METHODS[method].split(': ')[-1]})...",
                   expanded=True) as status:
        st.write("Running the model once per feature map of its target layer; the page stays usable in "
                 "other tabs, and the result is kept for this image and model.")
        _explanation(predictor, analysis, finding, method)
        status.update(label=f"{method} for {finding} computed", state="complete")
    return method


def _heatmap_panel(predictor: Predictor, analysis: Analysis, rows: list[dict], display: np.ndarray,
                   full: np.ndarray) -> tuple[Explanation, str, np.ndarray, Callable[[], np.ndarray]]:
    """The heatmap controls and the overlay on ``display`` (the windowed film at display size), with its
    caption; the returned function renders the download on ``full`` (the windowed film at the original
    resolution), only when it is asked for."""
    c1, c2, c3, c4 = st.columns([3, 3, 2, 2], vertical_alignment="bottom")
    finding = c1.selectbox("Finding", [r["finding"] for r in rows], key="heat_finding")
    methods = HEATMAP_METHODS
    arch_default = default_method(predictor)
    method = c2.selectbox("Method", methods, index=methods.index(arch_default),
                          key=_method_key(predictor, analysis.image_sha256),
                          format_func=lambda m: f"{m} (slow)" if m in EXPENSIVE_METHODS else m,
                          help=f"{arch_default} is this model's default (the best measured for its architecture, or "
                               "Grad-CAM where its training put that map on the chest); the choice applies to "
                               "this image and model only")
    opacity = c3.slider("Opacity", 0.0, 1.0, 0.45, 0.05, key="heat_opacity")
    contours = c4.checkbox("Outline lungs and heart", value=True, key="heat_contours")
    method = _confirm_expensive(predictor, analysis, finding, method, arch_default)
    exp = _explanation(predictor, analysis, finding, method)
    return (exp, f"{method} heatmap for {finding}", overlay(display, exp, finding, opacity, contours),
            lambda: overlay(full, exp, finding, opacity, contours))


def _anatomy_panel(exp: Explanation, finding: str) -> None:
    if not exp.anatomy.applicable:
        st.info(f"No anatomy map: {plain(exp.anatomy.reason)}")  # may quote DICOM tags
        return
    if float(exp.heatmaps.small[finding].max()) <= 0:  # the model-size map: no resize needed
        st.info(f"{exp.method} finds no positive evidence for {finding} at the model's last layer (the heatmap "
                "is empty), so there is no attention to place on the anatomy. Try gradcam++ or eigencam.")
    else:
        st.markdown("**Where the heatmap falls**")
        st.plotly_chart(shares_chart(exp.shares[finding]), key="shares_chart")
    if finding in exp.warnings:
        st.warning(exp.warnings[finding], icon=":material/report:")
    ctr = exp.ctr
    if ctr.get("ctr") is not None and ctr.get("reliable"):
        st.metric("Cardiothoracic ratio (estimate)", f"{ctr['ctr']:.2f}",
                  delta="above 0.5" if ctr.get("enlarged") else "0.5 or below", delta_color="off")
        st.caption(f"{ctr['note']}. Segmentation: {ctr.get('method', 'classical')}, confidence normal.")
    elif ctr.get("ctr") is not None:  # no headline: the number only with its caveat
        st.caption(f"Cardiothoracic ratio not reported: {ctr['caveat']} (estimate {ctr['ctr']:.2f}).")


def _positive_overlays(predictor: Predictor, analysis: Analysis, rows: list[dict], display: np.ndarray,
                       method: str) -> list[tuple[str, np.ndarray]]:
    """The report's heatmaps: the positive findings only (the most probable REPORT_HEATMAPS), whichever one is
    on screen."""
    out = []
    for r in [r for r in rows if r["positive"]][:REPORT_HEATMAPS]:
        exp = _explanation(predictor, analysis, r["finding"], method)
        out.append((f"{method} heatmap for {r['finding']}",
                    overlay(display, exp, r["finding"], st.session_state.get("heat_opacity", 0.45))))
    return out


def _downloads(result: dict[str, Any], shown: np.ndarray, report_overlays: Callable[[], list],
               full_overlay: Callable[[], np.ndarray], reader: str, stem: str, study: dict[str, str]) -> None:
    c1, c2, c3 = st.columns(3)
    c1.download_button("Overlay PNG", lambda: to_png(full_overlay()), f"{stem}_overlay.png", "image/png",
                       on_click="ignore", icon=":material/image:")
    c2.download_button("Result JSON", json.dumps(result, indent=2), f"{stem}_result.json", "application/json",
                       on_click="ignore", icon=":material/data_object:")
    c3.download_button("PDF report", lambda: report_pdf(result, shown, report_overlays(), reader, study), f"{stem}_report.pdf",
                       "application/pdf", on_click="ignore", icon=":material/picture_as_pdf:")


def _refused_view(user: User, analysis: Analysis, predictor: Predictor, thresholds: dict[str, float]) -> None:
    """An image the model cannot read: the reason first and large, the image, and no probability at all."""
    st.subheader(plain(analysis.file_name))
    st.error(plain(refusal_message(analysis.verdict)), icon=":material/block:")
    full, _display = _film(analysis)
    _study_panel(analysis)
    _show_viewer(analysis, full, [])
    result = result_dict(analysis, thresholds, predictor.ckpt.card)
    st.download_button("Result JSON", json.dumps(result, indent=2), f"{analysis.file_name.rsplit('.', 1)[0]}_result.json",
                       "application/json", on_click="ignore", icon=":material/data_object:")


@dataclass
class _Received:
    """A study image the PACS page opened here, shaped like an upload."""
    name: str
    data: bytes

    def getvalue(self) -> bytes:
        return self.data


def _from_pacs() -> list[_Received]:
    return [_Received(name, data) for name, data in st.session_state.get(PACS_OPEN_KEY, [])]


def render_analyze(user: User) -> None:
    st.title("Analyze")
    st.caption(DISCLAIMER)
    entries = available_models("No model is available. Train one on the Train page or with "
                               "`python -m medai train`.")
    if not entries:
        return
    task, entry = _pick_model(entries)
    predictor = cached_predictor(entry)
    thresholds = _thresholds(predictor)
    uploads = st.file_uploader(f"{UPLOAD_TITLES.get(task, task)} (PNG, JPEG or DICOM)", accept_multiple_files=True,
                               key="uploads", help="The type is read from the file's content; DICOM files need no "
                               "extension. Images this model cannot read are refused, with the reason.")
    analyses = _analyses(user, entry, predictor, [*(uploads or []), *_from_pacs()], thresholds)
    if not analyses:
        return
    analysis = _select(analyses, thresholds)
    for other in analyses:  # the batch table shows every decision at the current thresholds
        if other is not analysis:
            _sync_history(user, other, result_dict(other, thresholds, predictor.ckpt.card))
    if analysis.refused:
        _refused_view(user, analysis, predictor, thresholds)
        return
    rows = decide(analysis.labels, analysis.prediction.probabilities, thresholds, predictor.thresholds)
    st.subheader(plain(analysis.file_name))
    full, display = _film(analysis)
    exp, caption, overlay, full_overlay = _heatmap_panel(predictor, analysis, rows, display, full)
    _show_viewer(analysis, full, [(caption, overlay)])
    st.caption(caption)
    _study_panel(analysis)
    left, right = st.columns(2)
    with left:
        st.subheader("Findings")
        _findings_panel(rows)
    with right:
        st.subheader("Anatomy")
        _anatomy_panel(exp, st.session_state["heat_finding"])
    result = result_dict(analysis, thresholds, predictor.ckpt.card, exp.to_dict())
    _sync_history(user, analysis, result)
    shown = (display * 255 + 0.5).astype(np.uint8)
    _downloads(result, shown, lambda: _positive_overlays(predictor, analysis, rows, display, exp.method),
               full_overlay, user.username, analysis.file_name.rsplit(".", 1)[0], analysis.image.study)
