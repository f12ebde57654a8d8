"""PACS node throughput end to end: N DX images (real NIH ChestX-ray14 films, 512 px) stored in a real Orthanc,
routed to the node by C-STORE, analysed with the default chest model (heatmaps for the positive findings),
and the SR + overlays stored back in Orthanc. Prints images/min, latency (received -> sent) p50/p95, and
where the time goes (receive, analysis + objects, delivery).

    .venv/bin/python benchmarks/pacs_throughput.py [--images 200]

Needs Debian's orthanc (``make pacs-tools``)."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import DATA, ROOT, machine, table

from medai.catalog import DEFAULT_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a shipped model's name (default: the default chest model)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medai-pacs-bench-"))
    os.environ["MEDAI_HOME"] = str(tmp / "home")
    from pydicom.uid import generate_uid

    from medai.inference import Predictor
    from medai.pacs import queue
    from medai.pacs.node import Node
    from medai.pacs.work import Endpoint
    from tests.conftest import free_port
    from tests.orthanc import Orthanc
    from tests.test_pacs import dx_from_png

    pngs = sorted((DATA / "nih-cxr14-bbox" / "images").glob("*.jpg"))[: args.images]
    if not pngs:
        raise SystemExit(f"no images under {DATA / 'nih-cxr14-bbox' / 'images'}")
    orthanc = Orthanc(tmp / "orthanc", free_port(), free_port(), free_port()).start()
    try:
        study = generate_uid()
        ids = [orthanc.upload(dx_from_png(p, study))["ID"] for p in pngs]
        node = Node(Predictor(ROOT / "models" / f"{args.model}.safetensors"), args.model, port=orthanc.node_port,
                    destination=Endpoint(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)).start()
        t0 = time.time()
        orthanc.route_to_node(ids)
        received = time.time() - t0
        while not all(r["state"] in (queue.SENT, queue.SKIPPED, queue.FAILED) for r in queue.items(node.store)):
            time.sleep(0.5)
        total = time.time() - t0
        node.stop()
        rows = queue.items(node.store)
    finally:
        orthanc.stop()
    latency = sorted(r["updated_at"] - r["received_at"] for r in rows if r["state"] == queue.SENT)
    sent = len(latency)
    p95 = latency[min(len(latency) - 1, int(0.95 * len(latency)))] if latency else float("nan")
    print(f"## PACS node throughput ({machine()})\n")
    print(table([[len(pngs), sent, f"{received:.1f}", f"{total:.1f}", f"{60 * sent / total:.1f}",
                  f"{statistics.median(latency):.1f}" if latency else "-", f"{p95:.1f}",
                  f"{1000 * received / max(1, len(pngs)):.0f}"]],
                ["images", "sent", "receive all s", "end to end s", "images/min", "latency p50 s", "latency p95 s",
                 "receive ms/image"]))
    print(f"\nModel {args.model}; NIH films (nih-cxr14-bbox, 512x512) as 8-bit DX; one association from Orthanc; results by C-STORE.")


if __name__ == "__main__":
    main()
