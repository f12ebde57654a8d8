"""The PACS node against a real Orthanc: images stored in Orthanc are routed to ``medai pacs listen``'s
node by C-STORE, analysed through the analysis door, and the SR and overlay series come back into the same
study, valid by ``dciodvfy``; faults (PACS down, node killed with -9, non-chest and corrupt objects)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from tests.conftest import ROOT, need, run_cli
from tests.orthanc import orthanc_or_skip

MODEL = "pneumonia-hybrid"
SRC_DICOM = "dicom/siim_cxr_pa_mono2.dcm"


def dx_from_png(png: Path, study_uid: str, *, modality: str = "DX", body_part: str = "CHEST", view: str = "PA",
                patient: str = "Doe^Jane", patient_id: str = "P-0001") -> bytes:
    """A DX 'for presentation' instance holding a real PNG's pixels (as a modality would send it)."""
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = patient, patient_id, "ACC" + study_uid[-6:]
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "F", time.strftime("%Y%m%d"), "120000"
    ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, body_part, view
    ds.ImageType, ds.PresentationIntentType = ["ORIGINAL", "PRIMARY"], "FOR PRESENTATION"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def kermany_pngs(n: int) -> list[Path]:
    root = need("kermany-pneumonia")
    return sorted((root / "val" / "PNEUMONIA").glob("*"))[: n // 2] + sorted((root / "val" / "NORMAL").glob("*"))[: n - n // 2]


@pytest.fixture
def orthanc(tmp_path):
    server = orthanc_or_skip(tmp_path / "orthanc")
    yield server
    server.stop()


def start_listener(orthanc, home: Path) -> subprocess.Popen:
    log = open(home / "listener.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "medai", "pacs", "listen", "--model", MODEL, "--ae-title", "MEDAI",
                             "--port", str(orthanc.node_port), "--dest-ae", orthanc.ae_title, "--dest-host", "127.0.0.1",
                             "--dest-port", str(orthanc.dicom_port)], cwd=ROOT, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError((home / "listener.log").read_text())
        if b"listening" in (home / "listener.log").read_bytes():
            return proc
        time.sleep(0.3)
    raise AssertionError("listener did not start: " + (home / "listener.log").read_text())


def results_in(orthanc, study_uid: str, timeout: float = 240, want_sr: int = 1) -> dict[str, list[bytes]]:
    """The SR and SC instances Orthanc holds for the study, waiting until ``want_sr`` SRs are there."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[bytes]] = {"SR": [], "OT": [], "DX": []}
        for series in orthanc.series_of_study(study_uid):
            modality = series["MainDicomTags"].get("Modality", "")
            for inst in series["Instances"]:
                found.setdefault(modality, []).append(orthanc.instance_file(inst))
        if len(found["SR"]) >= want_sr or time.monotonic() > deadline:
            return found
        time.sleep(1)


def sr_probabilities(sr_bytes: bytes) -> dict[str, float]:
    ds = pydicom.dcmread(io.BytesIO(sr_bytes))
    out = {}

    def walk(items, finding=None):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if name == "Finding":
                code = item.ConceptCodeSequence[0]  # a code over 16 characters is a LongCodeValue
                finding = code.get("CodeValue") or code.LongCodeValue
            if name == "Model probability" and finding:
                out[finding] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                finding = walk(item.ContentSequence, finding) or finding
        return None

    for group in ds.ContentSequence:
        if "ContentSequence" in group:
            walk(group.ContentSequence)
    return out


def dciodvfy_errors(dicom: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "check.dcm"
    path.write_bytes(dicom)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def test_routed_chest_images_come_back_as_sr_and_overlays_in_the_same_study(orthanc, medai_home, tmp_path):
    if not shutil.which("dciodvfy"):
        pytest.skip("dicom3tools is not installed (make test installs it)")
    study_uid = generate_uid()
    pngs = kermany_pngs(2)
    dicoms = [dx_from_png(p, study_uid) for p in pngs]
    ids = [orthanc.upload(d)["ID"] for d in dicoms]
    real = [need(f"dicom/{name}").read_bytes() for name in ("siim_cxr_pa_mono2.dcm", "pydicom_data_RG1_UNCR.dcm")]
    real_ids = [orthanc.upload(d)["ID"] for d in real]  # the shared CR chest films, in their own studies
    proc = start_listener(orthanc, medai_home)
    try:
        orthanc.route_to_node(ids + real_ids)
        found = results_in(orthanc, study_uid, want_sr=2)
        for raw in real:
            ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
            back = results_in(orthanc, ds.StudyInstanceUID, want_sr=1)
            assert len(back["SR"]) == 1 and all(dciodvfy_errors(o, tmp_path) == [] for o in back["SR"] + back["OT"])
            assert pydicom.dcmread(io.BytesIO(back["SR"][0])).PatientID == ds.PatientID
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert len(found["SR"]) == 2, (medai_home / "listener.log").read_text()[-3000:]
    assert found["OT"], "no overlay for a positive finding"
    for obj in found["SR"] + found["OT"]:
        assert dciodvfy_errors(obj, tmp_path) == []
        ds = pydicom.dcmread(io.BytesIO(obj))
        assert ds.StudyInstanceUID == study_uid and ds.PatientID == "P-0001" and ds.AccessionNumber
        assert "ViewPosition" not in ds and "PixelData" not in ds or ds.Modality == "OT"
    for path, dicom in zip(pngs, dicoms):
        local = tmp_path / f"{path.stem}.dcm"
        local.write_bytes(dicom)
        predicted = json.loads(run_cli("predict", "--checkpoint", str(ROOT / "models" / f"{MODEL}.safetensors"), str(local),
                                       "--json", check=True).stdout)
        sop = pydicom.dcmread(io.BytesIO(dicom)).SOPInstanceUID
        sr = next(s for s in found["SR"] if pydicom.dcmread(io.BytesIO(s)).CurrentRequestedProcedureEvidenceSequence[0]
                  .ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop)
        findings = set(predicted[0]["operating_points"])  # every finding (a multiclass model's NORMAL is none)
        expected = {k: v for k, v in predicted[0]["probabilities"].items() if k in findings}
        assert findings and sr_probabilities(sr) == pytest.approx(expected, abs=1e-5)
    log = (medai_home / "listener.log").read_text()
    assert "Doe" not in log and "P-0001" not in log
    from medai.store import Store

    history = Store().history()  # linked to the study by UIDs; no patient name or ID in History or audit
    sops = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in dicoms}
    assert {h.result["dicom"]["sop_uid"] for h in history} >= sops
    assert study_uid in {h.result["dicom"]["study_uid"] for h in history}
    stored = json.dumps([h.result for h in history]) + json.dumps(Store().audit_log())
    assert "Doe" not in stored and "P-0001" not in stored


# ---- faults --------------------------------------------------------------------------------------

def send_to_node(port: int, dicoms: list[bytes]) -> list[int]:
    """C-STORE each object to the node (as a modality would); the status codes it answered."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(io.BytesIO(d)) for d in dicoms]
    ae = AE(ae_title="MODALITY")
    for sop_class, syntax in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDAI")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def echo(port: int) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDAI")
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


@pytest.fixture
def node(medai_home):
    from medai.inference import Predictor
    from medai.pacs.node import Node
    from tests.conftest import free_port

    node = Node(Predictor(ROOT / "models" / f"{MODEL}.safetensors"), MODEL, port=free_port())
    node.start()
    yield node
    node.stop()


def test_non_chest_objects_are_acknowledged_and_skipped_and_a_corrupt_one_refused(node, tmp_path):
    from medai.pacs import queue

    study = generate_uid()
    png = kermany_pngs(1)[0]
    tibia = need("dicom/pydicom_data_RG3_J2KR.dcm").read_bytes()  # CR, body part EXTREMITY
    ct = dx_from_png(png, study, modality="CT")
    lateral = dx_from_png(png, study, view="LL")
    no_pixels = pydicom.dcmread(io.BytesIO(dx_from_png(png, study)))
    del no_pixels.PixelData
    buf = io.BytesIO()
    no_pixels.save_as(buf, enforce_file_format=True)
    statuses = send_to_node(node.port, [tibia, ct, lateral, buf.getvalue()])
    assert statuses == [0, 0, 0, 0]  # acknowledged: the sender must not retry them
    rows = {r["sop_uid"]: r for r in queue.items(node.store)}
    reasons = [rows[pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SOPInstanceUID]["reason"]
               for d in (tibia, ct, lateral)] + [rows[no_pixels.SOPInstanceUID]["reason"]]
    assert all(r["state"] == queue.SKIPPED for r in rows.values())
    assert "EXTREMITY" in reasons[0] and "CT" in reasons[1] and "LL" in reasons[2] and "no pixel data" in reasons[3]
    # a malformed object (none of the UIDs that file it) is refused; the node answers the next call
    bad_ds = pydicom.Dataset()
    bad_ds.file_meta = FileMetaDataset()
    bad_ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bad_ds.SOPClassUID, bad_ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    bad_ds.Modality, bad_ds.Rows, bad_ds.Columns = "DX", 4, 4  # no Study Instance UID
    assert _send_raw(node.port, bad_ds) == 0xC210
    # a truncated file sent as it is (its pixel data cut short)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(dx_from_png(png, study)[:-5000])
    assert _send_raw(node.port, truncated) == 0xC210
    assert echo(node.port) == 0
    assert len(queue.items(node.store)) == 4  # nothing filed for the refused ones


def _send_raw(port: int, ds: pydicom.Dataset | Path) -> int:
    """C-STORE a dataset, or a file's bytes as they are (not decoded by the sender)."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDAI")
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def wait_for(predicate, timeout: float = 180, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_results_wait_for_a_pacs_that_is_down_and_are_delivered_when_it_is_back(orthanc, medai_home):
    from medai.inference import Predictor
    from medai.pacs import queue
    from medai.pacs.node import Node
    from medai.pacs.work import Endpoint
    from tests.conftest import free_port

    node = Node(Predictor(ROOT / "models" / f"{MODEL}.safetensors"), MODEL, port=free_port(),
                destination=Endpoint(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port)).start()
    try:
        orthanc.stop()
        study = generate_uid()
        assert send_to_node(node.port, [dx_from_png(kermany_pngs(1)[0], study)]) == [0]
        pending = wait_for(lambda: [r for r in queue.items(node.store) if r["attempts"] >= 1], what="a failed delivery")
        assert pending[0]["state"] == queue.DONE and "unreachable" in pending[0]["reason"]
        orthanc.start()
        wait_for(lambda: all(r["state"] == queue.SENT for r in queue.items(node.store)), 120, "the retried delivery")
        assert len(results_in(orthanc, study, timeout=30)["SR"]) == 1
        assert node.store.audit_log(action="pacs_send_failed") and node.store.audit_log(action="pacs_sent")
    finally:
        node.stop()


def test_a_listener_killed_mid_queue_loses_nothing_and_sends_nothing_twice(orthanc, medai_home):
    from medai.pacs import queue
    from medai.store import Store

    study = generate_uid()
    dicoms = [dx_from_png(p, study) for p in kermany_pngs(4)]
    ids = [orthanc.upload(d)["ID"] for d in dicoms]
    proc = start_listener(orthanc, medai_home)
    orthanc.route_to_node(ids)  # returns once the node has filed (and acknowledged) all four
    store = Store()
    wait_for(lambda: any(r["state"] in (queue.ANALYSING, queue.DONE, queue.SENT) for r in queue.items(store)),
             what="the first analysis")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = queue.items(store)
    assert len(rows) == 4 and not all(r["state"] == queue.SENT for r in rows)
    assert all(Path(r["path"]).exists() for r in rows if r["state"] != queue.SENT)  # nothing lost
    proc = start_listener(orthanc, medai_home)
    try:
        wait_for(lambda: all(r["state"] == queue.SENT for r in queue.items(store)), 300, "all four sent")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    found = results_in(orthanc, study, timeout=10, want_sr=4)
    sources = sorted(pydicom.dcmread(io.BytesIO(s)).CurrentRequestedProcedureEvidenceSequence[0]
                     .ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in found["SR"])
    assert sources == sorted(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in dicoms)  # one SR each
    assert len(queue.items(store)) == 4


def test_dicomweb_lists_studies_with_ai_status_and_analyses_one_back_into_it(orthanc, medai_home):
    study = generate_uid()
    other = generate_uid()
    for d in [dx_from_png(kermany_pngs(1)[0], study), dx_from_png(kermany_pngs(1)[0], other, modality="CR")]:
        orthanc.upload(d)
    listed = json.loads(run_cli("pacs", "studies", "--url", orthanc.dicomweb, "--since", "1d", "--json",
                                check=True).stdout)
    assert {s["study_uid"]: s["ai_status"] for s in listed} == {study: "not received", other: "not received"}
    only_dx = json.loads(run_cli("pacs", "studies", "--url", orthanc.dicomweb, "--modality", "DX", "--json",
                                 check=True).stdout)
    assert [s["study_uid"] for s in only_dx] == [study]
    done = run_cli("pacs", "analyze", study, "--model", MODEL, "--url", orthanc.dicomweb, "--stow-url", orthanc.dicomweb)
    assert done.returncode == 0, done.stderr + done.stdout
    assert len(results_in(orthanc, study, timeout=30)["SR"]) == 1  # delivered by STOW-RS
    listed = json.loads(run_cli("pacs", "studies", "--url", orthanc.dicomweb, "--json", check=True).stdout)
    assert {s["study_uid"]: s["ai_status"] for s in listed}[study] == "sent"
    again = run_cli("pacs", "analyze", study, "--model", MODEL, "--url", orthanc.dicomweb, "--stow-url", orthanc.dicomweb)
    assert again.returncode == 0 and len(results_in(orthanc, study, timeout=5)["SR"]) == 1  # once, not twice
    unreachable = run_cli("pacs", "studies", "--url", "http://127.0.0.1:9/dicom-web")
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr
    assert "QIDO-RS search at http://127.0.0.1:9/dicom-web failed: could not connect" in unreachable.stderr


def test_retention_deletes_only_finished_items_files_and_keeps_their_history(medai_home):
    """``medai pacs prune``: the received image and result objects of sent (and failed) items older than the
    limit go; an item analysed but not yet delivered, a recent one, the worklist rows, History and audit stay."""
    from medai.inference import Predictor
    from medai.pacs import queue, work
    from medai.store import Store

    store, predictor = Store(), Predictor(ROOT / "models" / f"{MODEL}.safetensors")
    study = generate_uid()
    for png in kermany_pngs(3):
        assert work.receive(store, dx_from_png(png, study), predictor, MODEL)[0] == queue.QUEUED
    assert work.receive(store, dx_from_png(kermany_pngs(1)[0], study, body_part="FOOT"), predictor, MODEL)[0] == queue.SKIPPED
    while (item := queue.claim(store)) is not None:
        work.analyse(store, item, predictor)
    old_sent, undelivered, recent_sent = queue.items(store, states=(queue.DONE,))[::-1]
    for item in (old_sent, recent_sent):
        queue.update(store, item["id"], state=queue.SENT)
    week_ago = time.time() - 8 * 86400
    with store.connect() as conn:  # age two items past the limit
        conn.execute("UPDATE pacs_queue SET updated_at = ? WHERE id IN (?, ?)", (week_ago, old_sent["id"], undelivered["id"]))
    files = {i["id"]: [Path(i["path"]), *Path(i["result"]["outbox"]).glob("*.dcm")]
             for i in (old_sent, undelivered, recent_sent)}
    assert all(len(f) >= 2 and all(p.is_file() for p in f) for f in files.values())  # image + SR at least
    history = len(store.history())

    dry = run_cli("pacs", "prune", "--older-than-days", "7", "--dry-run", check=True)
    assert "1 finished item(s)" in dry.stdout and "would free" in dry.stdout
    assert all(p.is_file() for f in files.values() for p in f)
    done = run_cli("pacs", "prune", "--older-than-days", "7", check=True)
    assert "1 finished item(s)" in done.stdout and "freed" in done.stdout
    assert not any(p.exists() for p in files[old_sent["id"]])
    assert all(p.is_file() for i in (undelivered, recent_sent) for p in files[i["id"]])

    rows = {r["id"]: r for r in queue.items(store)}
    assert len(rows) == 4 and rows[old_sent["id"]]["state"] == queue.SENT and rows[old_sent["id"]]["path"] is None
    assert rows[old_sent["id"]]["findings"] == old_sent["findings"]  # what was found stays on the worklist
    assert len(store.history()) == history
    assert queue.resend(store, study) == 1  # the recent one only: the pruned item has nothing left to send
    assert len(store.audit_log(action="pacs_pruned")) == 1
    assert run_cli("pacs", "prune", "--older-than-days", "7", check=True).stdout.startswith("0 finished")


def test_a_worker_killed_after_history_but_before_done_leaves_one_history_row(medai_home, monkeypatch):
    """The History row is written before the item is marked done; a worker dying in between analyses the
    image again after its lease, and that second analysis overwrites the first row instead of adding one."""
    from medai.inference import Predictor
    from medai.pacs import queue, work
    from medai.store import Store

    store, predictor = Store(), Predictor(ROOT / "models" / f"{MODEL}.safetensors")
    assert work.receive(store, dx_from_png(kermany_pngs(1)[0], generate_uid()), predictor, MODEL)[0] == queue.QUEUED
    real_update = queue.update

    def die_at_done(store_, item_id, **fields):
        if fields.get("state") == queue.DONE:
            raise SystemExit("killed")  # the process ends here: History written, the item still analysing
        real_update(store_, item_id, **fields)

    monkeypatch.setattr(queue, "update", die_at_done)
    with pytest.raises(SystemExit):
        work.analyse(store, queue.claim(store, lease_s=0), predictor)
    monkeypatch.setattr(queue, "update", real_update)
    assert len(store.history()) == 1 and queue.items(store)[0]["state"] == queue.ANALYSING
    again = queue.claim(store)  # the lease ran out: the item is back in reach
    assert again is not None
    work.analyse(store, again, predictor)
    assert queue.items(store)[0]["state"] == queue.DONE
    rows = store.history()
    assert len(rows) == 1 and rows[0].result["dicom"]["sop_uid"] == again["sop_uid"]


def test_the_default_chest_model_sends_the_three_most_probable_positive_heatmaps_and_every_finding(medai_home):
    """A 14-finding model flags several findings on a sick adult film; the SR carries all 14 and the worklist
    every positive one, while the PACS study gets the heatmaps of the three most probable positive findings
    only, as the PDF report does (seven overlays a film cluttered the study and tripled the delivery time)."""
    from medai.analysis import REPORT_HEATMAPS
    from medai.catalog import DEFAULT_MODEL
    from medai.inference import Predictor, decide
    from medai.pacs import queue, work
    from medai.store import Store

    store, predictor = Store(), Predictor(ROOT / "models" / f"{DEFAULT_MODEL}.safetensors")
    film = sorted((need("nih-cxr14-bbox") / "images").glob("*.jpg"))[0]  # 00000072_000, labelled Atelectasis
    assert work.receive(store, dx_from_png(film, generate_uid()), predictor, DEFAULT_MODEL)[0] == queue.QUEUED
    work.analyse(store, queue.claim(store), predictor)
    (item,) = queue.items(store)
    probabilities = item["result"]["probabilities"]
    rows = decide(list(probabilities), list(probabilities.values()), item["result"]["thresholds"])
    positive = [r["finding"] for r in rows if r["positive"]]
    assert item["state"] == queue.DONE and item["findings"] == positive and len(positive) > REPORT_HEATMAPS == 3
    files = {p: pydicom.dcmread(p) for p in Path(item["result"]["outbox"]).glob("*.dcm")}
    objects = list(files.values())
    (sr,) = [p for p, o in files.items() if o.Modality == "SR"]
    assert sr_probabilities(sr.read_bytes()) == pytest.approx(probabilities, abs=1e-5) and len(probabilities) == 14
    overlays = sorted((o for o in objects if o.Modality == "OT"), key=lambda o: int(o.InstanceNumber))
    assert [o.DerivationDescription.split(" heatmap")[0] for o in overlays] == positive[:3]
