"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests: started on free
loopback ports with a temporary storage folder and config, stopped afterwards. ``make test`` installs it
(apt) when missing; without it these tests skip, saying so."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class Orthanc:
    folder: Path
    http_port: int
    dicom_port: int
    node_port: int
    ae_title: str = "ORTHANC"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        config = {"Name": "medai-test", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
                  "DicomAet": self.ae_title, "StorageDirectory": str(self.folder / "db"),
                  "IndexDirectory": str(self.folder / "db"), "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
                  "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  "DicomModalities": {"medai": ["MEDAI", "127.0.0.1", self.node_port]}, "StableAge": 1}
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
                ) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=120) as resp:
            data = resp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, dicom: bytes) -> dict:
        return self.request("POST", "/instances", dicom, "application/dicom")

    def route_to_node(self, orthanc_ids: list[str]) -> dict:
        """Orthanc sends these instances to the node by C-STORE (its modality ``medai``)."""
        return self.request("POST", "/modalities/medai/store", json.dumps(orthanc_ids).encode())

    def series_of_study(self, study_uid: str) -> list[dict]:
        found = self.request("POST", "/tools/find", json.dumps(
            {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).encode())
        return found

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_id}/file")


def orthanc_or_skip(folder: Path) -> Orthanc:
    if not Path(ORTHANC).exists():
        pytest.skip("Orthanc is not installed (make test installs Debian's orthanc and orthanc-dicomweb)")
    return Orthanc(folder, free_port(), free_port(), free_port()).start()
