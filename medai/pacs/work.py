"""What the node does with one received image: the receive-time decision (queue or skip, from the tags),
the analysis through :mod:`medai.analysis` (the same door as the Analyze page and the API), the result
objects written to the outbox, History, and delivery to the destination (C-STORE and/or STOW-RS)."""

from __future__ import annotations

import io
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medai import analysis, gate
from medai.atomic import atomic_open
from medai.audit import AuditAction
from medai.errors import MedaiError
from medai.inference import Predictor, decide
from medai.pacs import queue
from medai.pacs.writers import FindingResult, overlay_image, structured_report
from medai.paths import medai_home
from medai.store import Store

log = logging.getLogger("medai.pacs")
ANALYSED_MODALITIES = {"CR", "DX"}
URGENT = {"Pneumothorax", "PNEUMONIA", "Pneumonia", "Effusion", "Edema", "Consolidation"}  # triage order
NODE_USER = "pacs-node"  # the History and audit user of the node's analyses


@dataclass
class Endpoint:
    """A DICOM destination (C-STORE SCP) and/or a DICOMweb STOW-RS URL to send results to."""
    ae_title: str = ""
    host: str = ""
    port: int = 0
    stow_url: str = ""
    calling_ae: str = "MEDAI"
    auth: dict[str, str] = field(default_factory=dict)  # DICOMweb user / password for STOW-RS

    @property
    def configured(self) -> bool:
        return bool((self.host and self.port) or self.stow_url)


def spool() -> Path:
    return medai_home() / "data" / "pacs"


def receive_reason(ds: pydicom.Dataset, card: dict[str, Any]) -> str | None:
    """Why a received object is not analysed (None: queue it), from its tags alone."""
    if "PixelData" not in ds:
        return f"no pixel data (SOP class {ds.get('SOPClassUID', '?')}: not an image)"
    modality = str(ds.get("Modality") or "").upper()
    if modality not in ANALYSED_MODALITIES:
        return f"modality {modality or 'missing'}; the node analyses chest radiographs (CR, DX)"
    return gate.tag_reason(gate.expected_kind(card) or "", modality, ds.get("BodyPartExamined"), ds.get("ViewPosition"))


def _check_pixel_length(ds: pydicom.Dataset) -> None:
    """Refuse native (uncompressed) pixel data shorter than its rows, columns and bits say: a truncated
    transfer is the sender's to repeat, not ours to queue."""
    from pydicom.pixels.utils import get_expected_length

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if "PixelData" in ds and syntax is not None and not syntax.is_compressed:
        expected = get_expected_length(ds)
        if len(ds.PixelData) < expected:
            raise ValueError(f"pixel data truncated: {len(ds.PixelData)} of {expected} bytes")


def receive(store: Store, raw: bytes, predictor: Predictor, model_name: str) -> tuple[str, str]:
    """File a received object: inbox + ``queued``, or ``skipped`` with the reason. The inbox file is
    written (fsync, rename) before the row, and both before the sender hears success. Returns (state,
    reason); raises ``InvalidDicomError`` for an object that is not DICOM."""
    ds = pydicom.dcmread(io.BytesIO(raw), force=False)
    sop_uid, study_uid = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    _check_pixel_length(ds)
    reason = receive_reason(ds, predictor.ckpt.card)
    common = dict(sop_uid=sop_uid, study_uid=study_uid, series_uid=str(ds.get("SeriesInstanceUID", "")),
                  modality=str(ds.get("Modality") or ""), model=model_name, model_sha256=predictor.ckpt.sha256)
    if reason:
        queue.add(store, **common, path=None, state=queue.SKIPPED, reason=reason)
        store.audit(NODE_USER, AuditAction.PACS_SKIPPED, sop_uid=sop_uid, study_uid=study_uid, reason=reason)
        return queue.SKIPPED, reason
    path = spool() / "inbox" / f"{sop_uid}.dcm"
    with atomic_open(path, "wb") as fh:
        fh.write(raw)
    if queue.add(store, **common, path=str(path), state=queue.QUEUED):
        store.audit(NODE_USER, AuditAction.PACS_RECEIVED, sop_uid=sop_uid, study_uid=study_uid, model=model_name)
        return queue.QUEUED, ""
    return "duplicate", "already received for this model; analysed and sent once"


def _results(an: analysis.Analysis) -> list[FindingResult]:
    rows = decide(an.labels, an.prediction.probabilities, an.prediction.thresholds)
    return [FindingResult(r["finding"], r["probability"], r["threshold"], r["positive"]) for r in rows]


def analyse(store: Store, item: dict[str, Any], predictor: Predictor) -> None:
    """Analyse one leased item and write its result objects to the outbox (state ``done``), or record
    why it was not analysed (``skipped`` by the input gate, ``failed`` when unreadable)."""
    path = Path(item["path"])
    try:
        data = path.read_bytes()
        an, exp = analysis.analyze_and_explain(predictor, item["model"], data, f"{item['sop_uid']}.dcm", "report")
    except (OSError, MedaiError) as exc:
        queue.update(store, item["id"], state=queue.FAILED, reason=str(exc)[:500])
        log.warning("PACS item %s (SOP %s) failed: %s", item["id"], item["sop_uid"], exc)
        return
    if an.refused:
        queue.update(store, item["id"], state=queue.SKIPPED, reason=an.verdict.reason[:500])
        store.audit(NODE_USER, AuditAction.PACS_SKIPPED, sop_uid=item["sop_uid"], reason=an.verdict.reason)
        return
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    results = _results(an)
    positive = [r for r in results if r.positive]
    film = analysis.display_film(np.round(an.image.pixels * 255).astype(np.uint8))
    objects = [structured_report(source, results, item["model"], item["model_sha256"])]
    objects += [overlay_image(source, analysis.overlay(film, exp, r.finding), r, item["model"], item["model_sha256"], i)
                for i, r in enumerate(positive, start=1) if r.finding in exp.heatmaps]
    outbox = spool() / "outbox" / str(item["id"])
    for ds in objects:
        with atomic_open(outbox / f"{ds.SOPInstanceUID}.dcm", "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
    analysis.record(NODE_USER, an, predictor.ckpt.card, dict(an.prediction.thresholds), store=store,
                    dicom_uids={"study_uid": item["study_uid"], "sop_uid": item["sop_uid"]},
                    replace=store.history_id_for_instance(NODE_USER, item["model_sha256"], item["sop_uid"]))
    urgent = max([r.probability for r in positive if r.finding in URGENT] or [0.0])
    queue.update(store, item["id"], state=queue.DONE, reason="", findings=[r.finding for r in positive],
                 priority=urgent, next_try=0, attempts=0,
                 result={"probabilities": {r.finding: r.probability for r in results},
                         "thresholds": {r.finding: r.threshold for r in results}, "outbox": str(outbox)})
    store.audit(NODE_USER, AuditAction.PACS_ANALYSED, sop_uid=item["sop_uid"], study_uid=item["study_uid"],
                model=item["model"], findings=[r.finding for r in positive])


def deliver(store: Store, item: dict[str, Any], endpoint: Endpoint) -> bool:
    """Send an analysed item's objects; on success ``sent``, otherwise a retry is scheduled with backoff.
    The received image stays in the inbox, for a reader to open the study on Analyze."""
    from medai.pacs.network import SendError, c_store, stow

    outbox = Path(item["result"]["outbox"])
    files = sorted(outbox.glob("*.dcm"))
    try:
        if endpoint.host and endpoint.port:
            c_store(endpoint, files)
        if endpoint.stow_url:
            stow(endpoint, files)
    except SendError as exc:
        wait = queue.delivery_failed(store, item, str(exc))
        store.audit(NODE_USER, AuditAction.PACS_SEND_FAILED, sop_uid=item["sop_uid"], reason=str(exc), retry_s=wait)
        log.warning("PACS delivery of item %s failed (retry in %s s): %s", item["id"], wait, exc)
        return False
    queue.update(store, item["id"], state=queue.SENT, reason="")
    store.audit(NODE_USER, AuditAction.PACS_SENT, sop_uid=item["sop_uid"], study_uid=item["study_uid"],
                objects=len(files))
    return True


def prune(store: Store, older_than_s: float, dry_run: bool = False) -> tuple[int, int]:
    """Retention: delete the received image and the result objects of items finished (sent, skipped,
    failed) more than ``older_than_s`` ago. What the node found stays: the queue row (worklist), the
    History row and the audit log; the PACS keeps the study and our results in it. Returns (items, bytes)."""
    items, freed = 0, 0
    for item in queue.finished_before(store, time.time() - older_than_s):
        image = Path(item["path"]) if item["path"] else None
        outbox = Path(item["result"]["outbox"]) if item["result"] and item["result"].get("outbox") else None
        files = [f for f in [image, *(outbox.glob("*") if outbox else [])] if f is not None and f.is_file()]
        size = sum(f.stat().st_size for f in files)
        items, freed = items + 1, freed + size
        if dry_run:
            continue
        if image:
            image.unlink(missing_ok=True)
        if outbox:
            shutil.rmtree(outbox, ignore_errors=True)
        result = {**item["result"], "outbox": None} if item["result"] else None
        queue.update(store, item["id"], path=None, result=result)
        store.audit(NODE_USER, AuditAction.PACS_PRUNED, sop_uid=item["sop_uid"], study_uid=item["study_uid"],
                    bytes=size)
    return items, freed
