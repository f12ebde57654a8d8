"""The one-page PDF report of an analysis, laid out to be filed: patient and study (from the DICOM),
model and reader, the input gate's verdict, the image and the heatmaps of the positive findings, every
finding with its probability, threshold (the model's or the reader's) and call, the CTR with its
confidence, and the disclaimer. Text is embedded as TrueType, so the PDF is searchable."""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np


PAGE = (8.27, 11.69)  # A4, inches
RED, GREEN, GREY = "#8a1c1c", "#225522", "#444444"


def ctr_line(result: dict[str, Any]) -> str:
    ctr = (result.get("explanation") or {}).get("cardiothoracic_ratio") or {}
    if ctr.get("ctr") is None:
        return f"Cardiothoracic ratio: not available ({ctr.get('note') or 'no anatomy map for this image'})"
    if not ctr.get("reliable", True):
        return f"Cardiothoracic ratio: not available - {ctr.get('caveat')} (estimate {ctr['ctr']:.2f})"
    return (f"Cardiothoracic ratio (automatic estimate): {ctr['ctr']:.2f}; {ctr.get('note', '')} "
            f"(segmentation {ctr.get('method', 'classical')}, confidence normal)")


def threshold_cell(row: dict[str, Any]) -> str:
    if row.get("threshold_source") == "reader":
        return f"{row['threshold']:.2f} changed by reader (model {row['model_threshold']:.2f})"
    return f"{row['threshold']:.2f} model's operating point"


def _key_values(fig: Any, pairs: list[tuple[str, str]], top: float, left: float = 0.06, columns: int = 2,
                line: float = 0.0135) -> float:
    """``pairs`` in ``columns`` columns from ``top`` down; returns the y below the last line."""
    per_column = -(-len(pairs) // columns) if pairs else 0
    for i, (key, value) in enumerate(pairs):
        x = left + (i // per_column) * (0.88 / columns)
        y = top - (i % per_column) * line
        fig.text(x, y, f"{key}:", fontsize=7.5, color=GREY, va="top")
        fig.text(x + 0.12, y, value[:60], fontsize=7.5, va="top")
    return top - per_column * line


def _panels(fig: Any, panels: list[tuple[str, np.ndarray]], top: float, bottom: float) -> float:
    """The image and up to three heatmaps in two columns, as large as the page width and the band from
    ``top`` to ``bottom`` allow; returns the y below them."""
    columns = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // columns)
    width = 0.88 / columns
    aspect = panels[0][1].shape[0] / panels[0][1].shape[1]  # height / width of the film
    # a panel's height in figure units for its width, plus its title; no taller than the band allows
    height = min((top - bottom) / rows, width * aspect * PAGE[0] / PAGE[1] + 0.025)
    for i, (title, img) in enumerate(panels):
        r, c = divmod(i, columns)
        ax = fig.add_axes((0.06 + c * width, top - (r + 1) * height, width - 0.01, height - 0.025))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(title, fontsize=8.5)
        ax.axis("off")
    return top - rows * height


def report_pdf(result: dict[str, Any], image_u8: np.ndarray, overlays: list[tuple[str, np.ndarray]],
               reader: str = "", study: dict[str, str] | None = None) -> bytes:
    """``image_u8``: the film as the reader windowed it; ``overlays``: (title, RGB) of the positive findings
    only; ``study``: the DICOM's patient and study fields (``DecodedImage.study``), printed here and
    nowhere else."""
    from matplotlib import rc_context

    with rc_context({"pdf.fonttype": 42}):
        buf = io.BytesIO()
        report_figure(result, image_u8, overlays, reader, study).savefig(
            buf, format="pdf", metadata={"Title": "MedAI CXR analysis report", "Creator": "MedAI CXR"})
    return buf.getvalue()


def _findings_table(fig: Any, rows: list[dict[str, Any]], y: float, height: float) -> None:
    """Every finding with its probability, threshold (whose), call and confidence; positives shaded."""
    table_ax = fig.add_axes((0.06, y, 0.88, height))
    table_ax.axis("off")
    cells = [[r["finding"], f"{r['probability']:.3f}", threshold_cell(r), "POSITIVE" if r["positive"] else "-",
              r["confidence"]] for r in rows]
    table = table_ax.table(cellText=cells, colLabels=["Finding", "Probability", "Threshold", "Call", "Confidence"],
                           loc="upper center", cellLoc="left", colWidths=[0.22, 0.11, 0.38, 0.11, 0.18])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (row, _), cell in table.get_celld().items():
        if row > 0 and rows[row - 1]["positive"]:
            cell.set_facecolor("#fde8e4")


def report_figure(result: dict[str, Any], image_u8: np.ndarray, overlays: list[tuple[str, np.ndarray]],
                  reader: str = "", study: dict[str, str] | None = None) -> Any:
    """The report page as a matplotlib Figure (``report_pdf`` saves it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=PAGE)
    model = result["model"]
    refused = result.get("status") == "refused"
    fig.text(0.06, 0.972, "MedAI CXR - analysis report", fontsize=16, weight="bold", va="top")
    fig.text(0.94, 0.972, result["created_at"], fontsize=8, color=GREY, ha="right", va="top")
    fig.text(0.06, 0.942, "Patient and study", fontsize=9.5, weight="bold", va="top")
    pairs = list((study or {}).items()) or [("Source", "no DICOM patient or study fields (PNG/JPEG upload)")]
    y = _key_values(fig, pairs, 0.924)
    fig.text(0.06, y - 0.006, "Analysis", fontsize=9.5, weight="bold", va="top")
    y = _key_values(fig, [
        ("File", str(result["file"])), ("Image sha256", result["image_sha256"][:32]),
        ("Reader", reader or "-"), ("Model", f"{model['name']} ({model['architecture']})"),
        ("Task", str(model.get("task") or "-")), ("Version", str(model.get("created_at") or "-")),
        ("Model sha256", model["sha256"][:32]), ("Val AUROC", f"{model['val_auroc']:.3f}"
                                                if isinstance(model.get("val_auroc"), (int, float)) else "-"),
    ], y - 0.024)
    gate_line = ("Input check: " + (f"REFUSED - {result.get('refusal')}" if refused else
                 "passed (" + str((result.get("input_gate") or {}).get("source", "-")) + ")"))
    fig.text(0.06, y - 0.006, gate_line, fontsize=8.5, color=RED if refused else GREEN, va="top", wrap=True)
    rows = result["results"][:16]
    table_height = 0.018 * (len(rows) + 1) if rows else 0.0
    y = _panels(fig, [("Image (as windowed by the reader)", image_u8)] + overlays[:3], y - 0.03,
                0.2 + table_height) - 0.01
    if rows:
        y -= table_height
        _findings_table(fig, rows, y, table_height)
    lines = [] if refused else [ctr_line(result)]
    if model.get("limitations"):
        lines.append(f"Limitations: {model['limitations']}")
    text = "\n".join(textwrap.fill(line, 140) for line in lines)
    fig.text(0.06, y - 0.015, text, fontsize=7.5, va="top")
    y -= 0.04 + 0.0115 * text.count("\n")
    if y > 0.16:  # the rest of the page: the reader's own impression, by hand or typed
        fig.text(0.06, y, "Reader's impression", fontsize=9.5, weight="bold", va="top")
        box = fig.add_axes((0.06, 0.1, 0.88, y - 0.12))
        box.set_xticks([])
        box.set_yticks([])
        for spine in box.spines.values():
            spine.set_color("#999999")
    fig.text(0.06, 0.075, "Reader's signature: ______________________     Date: ____________", fontsize=8.5)
    fig.text(0.06, 0.04, result["disclaimer"], fontsize=8.5, weight="bold", color=RED, wrap=True)
    return fig
