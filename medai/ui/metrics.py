"""The Metrics page: per-class tables, ROC/PR curves, confusion, calibration, a threshold explorer and a
side-by-side comparison of models on the same data."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from medai.imaging import file_key
from medai.catalog import ModelEntry
from medai.config import DataConfig
from medai.errors import MedaiError
from medai.evaluation.calibration import reliability_bins
from medai.evaluation.compare import compare_tables
from medai.evaluation.curves import at_threshold, comparison_csv, multiclass_confusion, pr_points, roc_points
from medai.evaluation.report import PredictionTable
from medai.evaluation.runner import Evaluation, evaluate_checkpoint, stored_evaluation
from medai.models.checkpoint import load_checkpoint
from medai.paths import data_dir, medai_home
from medai.store import User
from medai.ui.train import datasets
from medai.ui.widgets import available_models, plain

OWN_VALIDATION = "each model's own validation split"


@st.cache_data(show_spinner="Evaluating...", max_entries=16)
def _evaluate(path: str, sha_key: tuple, data: dict, split: str) -> Evaluation:
    """Cached by (checkpoint file identity, dataset settings, split)."""
    return evaluate_checkpoint(load_checkpoint(path), DataConfig(**data), split, n_boot=200)


def _data_for(entry: ModelEntry, choice: str) -> dict:
    trained_on = entry.card.get("training_config", {}).get("data", {})
    if choice == OWN_VALIDATION:
        if not trained_on.get("root"):
            raise MedaiError(f"{entry.name} does not record its training data; choose a dataset")
        return {k: v for k, v in trained_on.items() if k in DataConfig.__dataclass_fields__}
    return {"root": choice}


def evaluation_for(entry: ModelEntry, choice: str, split: str) -> Evaluation:
    if entry.source == "run" and choice == OWN_VALIDATION and split == "val":
        return stored_evaluation(Path(entry.path).parent)  # what the trainer measured, no recomputation
    return _evaluate(str(entry.path), file_key(entry.path), _data_for(entry, choice), split)


@st.cache_data(show_spinner="Testing the differences...", max_entries=32)
def _paired(a: PredictionTable, b: PredictionTable) -> dict:
    return compare_tables(a, b, n_boot=1000)


def _table(ev: Evaluation, labels: list[str]) -> PredictionTable | None:
    ids = ev.preds.get("ids")
    return None if ids is None else PredictionTable(list(ids), list(labels), ev.preds["targets"], ev.probs)


def _paired_differences(results: dict[str, tuple[ModelEntry, Evaluation]]) -> None:
    """Each further model against the first, on the images both were evaluated on: is the difference real?"""
    (base, (base_entry, base_ev)), *others = results.items()
    base_table = _table(base_ev, base_entry.card["labels"])
    rows, details, skipped = [], {}, []
    for name, (entry, ev) in others:
        table = _table(ev, entry.card["labels"])
        try:
            if base_table is None or table is None:
                raise MedaiError("no image ids stored with this evaluation")
            out = _paired(base_table, table)
        except MedaiError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        m = out["macro"]
        rows.append({"model": name, "against": base, "images": out["n"], "findings": m["findings"],
                     "macro AUROC": m["auroc_b"], "against's": m["auroc_a"], "difference": m["diff"],
                     "95% CI": f"{m['ci95'][0]:+.3f} to {m['ci95'][1]:+.3f}", "p": m["p"]})
        details[name] = [{"finding": lab, "positives": r["support"], name: r["auroc_b"], base: r["auroc_a"],
                          "difference": r["diff"], "95% CI": f"{r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f}",
                          "p": r["p"]} for lab, r in out["per_class"].items()]
    st.markdown(f"**Paired differences against {base}** (the same images: DeLong's test per finding, a paired "
                "bootstrap for the macro mean; a CI that spans 0 means no real difference)")
    if rows:
        st.dataframe(rows, hide_index=True, key="paired_differences")
        for name, per_finding in details.items():
            with st.expander(f"{name} against {base}, per finding"):
                st.dataframe(per_finding, hide_index=True, key=f"paired_{name}")
    for line in skipped:
        st.caption(plain(f"No paired test for {line}"))


def per_class_rows(metrics: dict) -> list[dict]:
    keys = ("auroc", "ap", "f1", "sensitivity", "specificity", "ppv", "npv", "threshold", "support")
    rows = []
    for lab, c in metrics["per_class"].items():
        ci = c.get("auroc_ci95")
        rows.append({"class": lab, **{k: c.get(k) for k in keys},
                     "AUROC 95% CI": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else ""})
    rows.append({"class": "macro", **{k: metrics["macro"].get(k) for k in keys}, "AUROC 95% CI": ""})
    rows.append({"class": "micro", **{k: metrics.get("micro", {}).get(k) for k in keys}, "AUROC 95% CI": ""})
    return rows


def _curve_figure(curves: dict, x: str, y: str, title: str, diagonal: bool) -> go.Figure:
    fig = go.Figure()
    for name, pts in curves.items():
        fig.add_scatter(x=pts[x], y=pts[y], mode="lines", name=name)
    if diagonal:
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"}, name="chance")
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=420, margin={"t": 40, "l": 10, "r": 10})
    return fig


def _calibration_figure(ev: Evaluation, kind: str) -> go.Figure:
    bins = reliability_bins(ev.preds["targets"], ev.probs, kind)
    fig = go.Figure()
    fig.add_scatter(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers",
                    name="model", text=[f"n={b['count']}" for b in bins])
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"}, name="perfect")
    cal = ev.metrics.get("calibration", {})
    fig.update_layout(title=f"Reliability (ECE {cal.get('ece_before', 0):.4f} before, "
                      f"{cal.get('ece_after', 0):.4f} after temperature scaling)",
                      xaxis_title="confidence", yaxis_title="observed accuracy", height=420,
                      margin={"t": 40, "l": 10, "r": 10})
    return fig


def _threshold_explorer(ev: Evaluation, labels: list[str], key: str) -> None:
    c1, c2 = st.columns(2)
    label = c1.selectbox("Class", labels, key=f"thr_class_{key}")
    i = labels.index(label)
    default = float(ev.metrics["per_class"][label]["threshold"])
    threshold = c2.slider("Threshold", 0.0, 1.0, default, 0.01, key=f"thr_value_{key}")
    stats = at_threshold(ev.preds["targets"], ev.probs, i, threshold)
    cols = st.columns(4)
    for col, name in zip(cols, ("sensitivity", "specificity", "ppv", "npv")):
        col.metric(name, "-" if stats[name] is None else f"{stats[name]:.3f}")
    st.dataframe([{"": "actually positive", "predicted positive": stats["tp"], "predicted negative": stats["fn"]},
                  {"": "actually negative", "predicted positive": stats["fp"], "predicted negative": stats["tn"]}],
                 hide_index=True, key=f"two_by_two_{key}")


def data_label(root: str | None) -> str:
    """A dataset as users name it: relative to the data folder, never the server's absolute path."""
    if not root:
        return "stored evaluation"
    path = Path(root)
    for base in (data_dir(), medai_home() / "data"):
        try:
            return str(path.resolve().relative_to(base))
        except ValueError:
            continue
    return path.name


def task_of(card: dict) -> str:
    return card["task"].get("name") or card["task"]["kind"]


def confusion_figure(cm, labels: list[str]) -> go.Figure:
    """Rows are the true class top to bottom, in the same order as the predicted columns left to right."""
    fig = go.Figure(go.Heatmap(z=cm, x=labels, y=labels, text=cm, texttemplate="%{text}", colorscale="Blues"))
    fig.update_yaxes(autorange="reversed", title="true")
    fig.update_xaxes(title="predicted", side="top")
    return fig.update_layout(title="Confusion at arg-max", height=420)


def render_one(name: str, ev: Evaluation, labels: list[str], kind: str) -> None:
    st.subheader(f"{name}: {ev.metrics['n']} images ({data_label(ev.metrics.get('data', {}).get('root'))})")
    st.dataframe(per_class_rows(ev.metrics), hide_index=True, key=f"table_{name}")
    y = ev.preds["targets"]
    left, right = st.columns(2)
    left.plotly_chart(_curve_figure(roc_points(y, ev.probs, labels), "fpr", "tpr", "ROC", True), key=f"roc_{name}")
    right.plotly_chart(_curve_figure(pr_points(y, ev.probs, labels), "recall", "precision", "Precision-recall",
                                     False), key=f"pr_{name}")
    left, right = st.columns(2)
    left.plotly_chart(_calibration_figure(ev, kind), key=f"cal_{name}")
    if kind == "multiclass":
        cm = multiclass_confusion(y, ev.probs)
        right.plotly_chart(confusion_figure(cm, labels), key=f"cm_{name}")
    with right if kind != "multiclass" else st.container():
        st.markdown("**Threshold explorer**")
        _threshold_explorer(ev, labels, name)


def render_metrics(user: User) -> None:
    st.title("Metrics")
    entries = available_models("No models yet: train one on the Train page.")
    if not entries:
        return
    names = [e.name for e in entries]
    chosen = st.multiselect("Models", names, default=names[:1], key="metrics_models")
    c1, c2 = st.columns(2)
    data_choice = c1.selectbox("Evaluate on", [OWN_VALIDATION, *datasets()], key="metrics_data")
    split = c2.selectbox("Split", ["val", "train", "all", "test"], key="metrics_split")
    results = {}
    for name in chosen:
        entry = entries[names.index(name)]
        try:
            results[name] = (entry, evaluation_for(entry, data_choice, split))
        except MedaiError as exc:
            st.error(plain(f"{name}: {exc}"))
    if len(results) > 1:
        st.subheader("Comparison")
        tasks = {task_of(e.card) for e, _ in results.values()}
        if len(tasks) > 1 or len({tuple(e.card["labels"]) for e, _ in results.values()}) > 1:
            st.warning(f"These models do different tasks ({', '.join(sorted(tasks))}) with different labels: "
                       "their numbers are not comparable with each other. Compare models of one task.")
        rows = [{"model": n, "task": task_of(e.card), "architecture": e.card["architecture"], "images": ev.metrics["n"],
                 **{f"macro {k}": ev.metrics["macro"][k] for k in ("auroc", "ap", "f1", "sensitivity", "specificity")},
                 "ECE after": ev.metrics["calibration"]["ece_after"]} for n, (e, ev) in results.items()]
        st.dataframe(rows, hide_index=True, key="comparison")
        st.download_button("Comparison CSV", comparison_csv(rows), "comparison.csv", "text/csv", on_click="ignore")
        _paired_differences(results)
        common = sorted(set.intersection(*(set(e.card["labels"]) for e, _ in results.values())))
        if common:
            label = st.selectbox("ROC of class", common, key="compare_class")
            curves = {n: roc_points(ev.preds["targets"], ev.probs, e.card["labels"]).get(label)
                      for n, (e, ev) in results.items()}
            st.plotly_chart(_curve_figure({n: c for n, c in curves.items() if c}, "fpr", "tpr",
                                          f"ROC: {label}", True), key="compare_roc")
    for name, (entry, ev) in results.items():
        st.divider()
        render_one(name, ev, entry.card["labels"], entry.card["task"]["kind"])
