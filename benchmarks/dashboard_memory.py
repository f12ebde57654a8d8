"""Peak memory (RSS) of the dashboard process with the shipped chest models loaded and used.

    .venv/bin/python benchmarks/dashboard_memory.py

Runs the real dashboard script in this process through Streamlit's AppTest (the same code path a server
runs per session, without the web server): sign in, then on the Analyze page analyse a real chest X-ray
with the default 14-finding chest model, then pick each shipped pneumonia model in turn and analyse the
same film with its heatmap and anatomy map. Reports the resident set after start-up, after each model, and
the peak (VmHWM), read from /proc/self/status.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from _common import DATA, ROOT, machine, table

from medai.catalog import DEFAULT_MODEL

MODELS = [DEFAULT_MODEL, "pneumonia-hybrid", "pneumonia-densenet121", "pneumonia-vit"]
PASSWORD = "correct horse battery"


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="medai-mem-"))
    os.environ.update(MEDAI_HOME=str(home), MEDAI_DATA_DIR=str(DATA))
    from streamlit.testing.v1 import AppTest

    from medai import auth
    from medai.store import Store

    auth.create_user(Store(), "rad1", PASSWORD, "radiologist")
    image = DATA / "nih-cxr14-sample" / "fullres" / "00000211_000.png"  # a 1024-px NIH film (Cardiomegaly)
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=300).run()
    at.text_input[0].set_value("rad1")
    at.text_input[1].set_value(PASSWORD)
    at.button[0].click().run()
    rows = [["signed in: Analyze page open, default model loaded, no upload yet", *[round(v) for v in rss_mb()]]]
    for name in MODELS:
        box = at.selectbox(key="analyze_model_Chest X-ray")
        box.set_value(next(o for o in box.options if str(o).startswith(name) or name in str(o)))
        at.run()
        at.file_uploader[0].set_value((image.name, image.read_bytes(), "image/png")).run()
        assert not at.exception, at.exception
        assert any("heatmap for" in c.value for c in at.caption), f"{name}: no heatmap shown"
        rows.append([f"+ {name} selected, one analysis with heatmap", *[round(v) for v in rss_mb()]])
    print(f"## Dashboard memory, the shipped chest models ({machine()})\n")
    print("The dashboard script under Streamlit's AppTest in one process; RSS from /proc/self/status.\n")
    print(table(rows, ["state", "RSS MB", "peak RSS MB"]))


if __name__ == "__main__":
    main()
