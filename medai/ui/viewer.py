"""A small image viewer of our own for the Analyze and History pages: panes side by side (the film at
full resolution, its heatmap) that zoom and pan together, with window/level in the image's units.

The panes are drawn by a self-contained HTML page in an ``st.iframe`` (no network, no external script):
mouse wheel or +/- zooms about the pointer, dragging pans, double-click or "Fit" fits, "1:1" shows one
image pixel per screen pixel. The view (zoom and position) is kept per image in the browser's session
storage, so changing the window or the heatmap redraws the panes where the reader left them. Window,
level and invert are Streamlit widgets: the image is windowed here, in its own units, from its values."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import streamlit as st
from PIL import Image

from medai.data.io import DecodedImage
from medai.display import ImageScale, Window, image_scale

# The film pane is sent at full resolution up to this side (films are rarely larger; bigger ones are
# scaled down and the viewer says so).
MAX_SIDE = 4096
VIEWER_TITLE = "Image viewer"


_ENCODED: OrderedDict[bytes, str] = OrderedDict()  # the last few panes encoded, by content
_ENCODED_KEEP = 8
_ENCODED_LOCK = threading.Lock()


def _png_b64(image: np.ndarray) -> str:
    """PNG in base64, remembered by content: every rerun (a moved slider elsewhere on the page) draws the
    viewer again, and hashing a film costs ~50x less than encoding it (0.27 s for a 2k x 2k film)."""
    key = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.shape).encode()[:16]).digest()
    with _ENCODED_LOCK:  # sessions run in threads
        if key in _ENCODED:
            _ENCODED.move_to_end(key)
            return _ENCODED[key]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=3)
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    with _ENCODED_LOCK:
        _ENCODED[key] = encoded
        while len(_ENCODED) > _ENCODED_KEEP:
            _ENCODED.popitem(last=False)
    return encoded


def full_resolution(image: np.ndarray) -> np.ndarray:
    """The film as sent to the viewer: at full resolution, unless a side exceeds ``MAX_SIDE``."""
    h, w = image.shape[:2]
    if max(h, w) <= MAX_SIDE:
        return image
    scale = MAX_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def viewer_html(panes: Sequence[tuple[str, np.ndarray]], size: tuple[int, int], view_key: str,
                note: str = "") -> str:
    """The viewer page: ``panes`` are (caption, uint8 grey or RGB image) of one film at any resolution,
    drawn over the same ``size`` (width, height: the film's pixels) so that they zoom and pan together.
    Captions and the note are escaped: they may quote file names."""
    width, height = size
    cells = "".join(
        f'<div class="pane"><img alt="{html.escape(caption)}" data-native="{img.shape[1]}x{img.shape[0]}" '
        f'src="data:image/png;base64,{_png_b64(img)}"><div class="cap">{html.escape(caption)}</div></div>'
        for caption, img in panes)
    config = json.dumps({"w": width, "h": height, "key": f"medai-view-{view_key}"})
    return (_PAGE.replace("@@CELLS@@", cells).replace("@@NOTE@@", html.escape(note))
            .replace("@@CONFIG@@", config.replace("</", "<\\/")))


def show(panes: Sequence[tuple[str, np.ndarray]], size: tuple[int, int], view_key: str, note: str = "",
         height: int = 620) -> None:
    st.iframe(viewer_html(panes, size, view_key, note), height=height, alt=VIEWER_TITLE)


def window_controls(image: DecodedImage, key: str) -> tuple[ImageScale, Window, bool]:
    """Preset, level, width (in the image's units) and invert; a preset sets level and width, which the
    reader can then move (the preset then reads "custom")."""
    scale = image_scale(image)
    names = list(scale.presets)
    preset_key, level_key, width_key = f"wl_preset_{key}", f"wl_level_{key}", f"wl_width_{key}"

    def apply_preset() -> None:
        chosen = scale.presets.get(st.session_state[preset_key])
        if chosen is not None:
            chosen = scale.clamp(chosen)
            st.session_state[level_key], st.session_state[width_key] = chosen.center, chosen.width

    if level_key not in st.session_state:
        st.session_state[preset_key] = names[0]
        apply_preset()
    span = max(scale.high - scale.low, scale.step)
    c1, c2, c3, c4 = st.columns([3, 3, 3, 1], vertical_alignment="bottom")
    c1.selectbox("Window preset", [*names, "custom"], key=preset_key, on_change=apply_preset,
                 help="Film presets follow this film's own brightness range; CT presets are in HU")
    unit = scale.unit
    def moved() -> None:
        st.session_state[preset_key] = "custom"

    level = c2.slider(f"Level ({unit})", scale.low, scale.high, step=scale.step, key=level_key, on_change=moved)
    width = c3.slider(f"Width ({unit})", scale.step, 2 * span, step=scale.step, key=width_key, on_change=moved)
    invert = c4.checkbox("Invert", key=f"wl_invert_{key}")
    return scale, Window(float(level), float(width)), invert


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><style>
html,body{margin:0;height:100%;background:#0e1117;color:#e6e6e6;font:13px system-ui,sans-serif}
#viewer{display:flex;flex-direction:column;height:100%}
.bar{display:flex;gap:6px;align-items:center;padding:4px 2px 6px}
.bar button{background:#262730;color:#e6e6e6;border:1px solid #555;border-radius:4px;padding:2px 10px;cursor:pointer}
.bar button:hover{border-color:#ff4b4b}
#readout{margin-left:6px;font-variant-numeric:tabular-nums}
.hint{margin-left:auto;color:#999;font-size:12px}
.panes{display:flex;gap:6px;flex:1;min-height:0}
.pane{position:relative;flex:1;overflow:hidden;background:#000;cursor:grab;touch-action:none;border-radius:4px}
.pane.dragging{cursor:grabbing}
.pane img{position:absolute;left:0;top:0;transform-origin:0 0;user-select:none;-webkit-user-drag:none;max-width:none}
.pane.pixels img{image-rendering:pixelated}
.cap{position:absolute;left:6px;top:4px;padding:1px 6px;background:rgba(0,0,0,.6);border-radius:3px;font-size:12px}
</style></head><body>
<div id="viewer" tabindex="0">
<div class="bar">
<button id="zoom-in" title="Zoom in (+)">+</button><button id="zoom-out" title="Zoom out (-)">&minus;</button>
<button id="fit" title="Fit (0 or double-click)">Fit</button><button id="one" title="One image pixel per screen pixel (1)">1:1</button>
<span id="readout"></span><span class="hint">wheel: zoom &middot; drag: pan &middot; @@NOTE@@</span>
</div>
<div class="panes">@@CELLS@@</div>
</div>
<script>
(function () {
  const cfg = @@CONFIG@@;
  const root = document.getElementById("viewer");
  const panes = Array.from(document.querySelectorAll(".pane"));
  const imgs = panes.map(p => p.querySelector("img"));
  let view = null;
  const box = () => panes[0].getBoundingClientRect();
  function fitted() {
    const b = box();
    const s = Math.min(b.width / cfg.w, b.height / cfg.h);
    return {s: s, x: (b.width - cfg.w * s) / 2, y: (b.height - cfg.h * s) / 2, fit: true};
  }
  function limits() { const f = fitted().s; return [f / 2, Math.max(32, f * 4)]; }
  function draw() {
    for (const img of imgs) {
      img.style.width = cfg.w + "px"; img.style.height = cfg.h + "px";
      img.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.s + ")";
    }
    panes.forEach(p => p.classList.toggle("pixels", view.s >= 2));
    const pct = Math.round(view.s * 100);
    document.getElementById("readout").textContent = "Zoom " + pct + "% of full resolution (" + cfg.w + " x " + cfg.h + ")";
    root.dataset.zoom = view.s.toFixed(5); root.dataset.x = view.x.toFixed(1); root.dataset.y = view.y.toFixed(1);
    root.dataset.fit = view.fit ? "1" : "0";
    try { sessionStorage.setItem(cfg.key, JSON.stringify(view)); } catch (e) {}
  }
  function zoomAt(factor, px, py) {
    const [lo, hi] = limits();
    const s = Math.min(hi, Math.max(lo, view.s * factor));
    view = {s: s, x: px - (px - view.x) * s / view.s, y: py - (py - view.y) * s / view.s, fit: false};
    draw();
  }
  function centre() { const b = box(); return [b.width / 2, b.height / 2]; }
  function oneToOne() {
    const [cx, cy] = centre();
    zoomAt(1 / view.s, cx, cy);
  }
  function start() {
    try { const kept = JSON.parse(sessionStorage.getItem(cfg.key) || "null");
          if (kept && kept.s > 0 && !kept.fit) view = kept; } catch (e) {}
    view = view || fitted();
    draw();
  }
  for (const pane of panes) {
    pane.addEventListener("wheel", ev => {
      ev.preventDefault();
      const r = pane.getBoundingClientRect();
      zoomAt(Math.pow(1.0015, -ev.deltaY), ev.clientX - r.left, ev.clientY - r.top);
    }, {passive: false});
    pane.addEventListener("pointerdown", ev => {
      pane.setPointerCapture(ev.pointerId); pane.classList.add("dragging");
      let last = [ev.clientX, ev.clientY];
      const move = e => {
        view = {s: view.s, x: view.x + e.clientX - last[0], y: view.y + e.clientY - last[1], fit: false};
        last = [e.clientX, e.clientY]; draw();
      };
      const up = () => { pane.classList.remove("dragging"); pane.removeEventListener("pointermove", move);
                         pane.removeEventListener("pointerup", up); pane.removeEventListener("pointercancel", up); };
      pane.addEventListener("pointermove", move); pane.addEventListener("pointerup", up);
      pane.addEventListener("pointercancel", up);
    });
    pane.addEventListener("dblclick", () => { view = fitted(); draw(); });
  }
  document.getElementById("zoom-in").onclick = () => zoomAt(1.25, ...centre());
  document.getElementById("zoom-out").onclick = () => zoomAt(0.8, ...centre());
  document.getElementById("fit").onclick = () => { view = fitted(); draw(); };
  document.getElementById("one").onclick = oneToOne;
  root.addEventListener("keydown", ev => {
    const keys = {"+": () => zoomAt(1.25, ...centre()), "=": () => zoomAt(1.25, ...centre()),
                  "-": () => zoomAt(0.8, ...centre()), "0": () => { view = fitted(); draw(); }, "1": oneToOne};
    if (keys[ev.key]) { keys[ev.key](); ev.preventDefault(); }
  });
  window.addEventListener("resize", () => { if (view && view.fit) { view = fitted(); draw(); } });
  if (document.readyState === "complete") start(); else window.addEventListener("load", start);
})();
</script></body></html>
"""
