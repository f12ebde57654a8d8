"""DICOM networking: sending result objects (C-STORE SCU, STOW-RS) and the DICOMweb client for finding
and fetching studies (QIDO-RS, WADO-RS). Credentials, when given, go to the HTTP session only: never to
logs or errors."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from medai.errors import MedaiError

if TYPE_CHECKING:
    from medai.pacs.work import Endpoint

TIMEOUT_S = 30


class SendError(MedaiError):
    """The destination could not take the objects (down, refused, timed out)."""


def c_store(endpoint: Endpoint, files: list[Path]) -> None:
    """Send ``files`` to the endpoint's C-STORE SCP in one association; every one must be accepted."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=endpoint.calling_ae)
    # connection_timeout too: pynetdicom's default (None) waits for the kernel's SYN retries, about 2 minutes,
    # when the PACS's host drops the connection attempt (a dead route, a firewall, a full backlog)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(endpoint.host, endpoint.port, ae_title=endpoint.ae_title)
    if not assoc.is_established:
        raise SendError(f"no association with {endpoint.ae_title}@{endpoint.host}:{endpoint.port} "
                        "(is the PACS running, and does it know this AE title?)")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise SendError(f"{endpoint.ae_title} refused {ds.SOPClassUID.name} "
                                f"(status {'none' if code is None else hex(code)})")
    finally:
        assoc.release()


def client(url: str, username: str = "", password: str = "") -> Any:
    import requests
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = create_session_from_user_pass(username, password) if username else requests.Session()
    web = DICOMwebClient(url=url, session=session, timeout=TIMEOUT_S)
    # One attempt per request. The library's default retries every failure, a refused connection included,
    # five times with exponential waits (30 s before a search says the PACS is down); deliveries are retried
    # by the queue's own backoff, and an interactive search should answer at once.
    web.set_http_retry_params(retry=False)
    return web


def stow(endpoint: Endpoint, files: list[Path]) -> None:
    import requests

    try:
        client(endpoint.stow_url, **endpoint.auth).store_instances([pydicom.dcmread(f) for f in files])
    except (requests.RequestException, OSError) as exc:
        raise SendError(_failure("STOW-RS to", endpoint.stow_url, exc)) from None


def _safe(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)  # no credentials in messages


_HTTP_HINTS = {401: "check the DICOMweb user and password", 403: "the PACS refuses this user",
               404: "check the DICOMweb root", 413: "the PACS takes no objects this large"}


def _failure(what: str, url: str, exc: BaseException) -> str:
    """What went wrong talking to ``url``, said so that an administrator knows what to check. Built from the
    exception's kind and the HTTP status only: its text can hold the URL with credentials or the server's
    error page."""
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        hint = _HTTP_HINTS.get(response.status_code)
        why = f"HTTP {response.status_code} {response.reason or ''}".rstrip() + (f" ({hint})" if hint else "")
    elif isinstance(exc, requests.Timeout):
        why = f"no answer within {TIMEOUT_S} s"
    elif isinstance(exc, requests.ConnectionError):
        why = "could not connect (is the PACS running, and is the address right?)"
    else:
        why = type(exc).__name__
    return f"{what} {_safe(url)} failed: {why}"


def since_date(text: str) -> str:
    """``2d``, ``12h``, ``1w`` or ``YYYYMMDD`` -> a DICOM date range ``YYYYMMDD-``."""
    match = re.fullmatch(r"(\d+)([hdw])", text.strip())
    if match:
        hours = int(match[1]) * {"h": 1, "d": 24, "w": 168}[match[2]]
        return (dt.date.today() - dt.timedelta(hours=hours)).strftime("%Y%m%d") + "-"
    if re.fullmatch(r"\d{8}", text.strip()):
        return text.strip() + "-"
    raise MedaiError(f"--since {text!r}: give an age such as 2d, 12h, 1w, or a date YYYYMMDD")


def search_studies(url: str, since: str | None = None, modality: str | None = None, **auth: str) -> list[dict]:
    """QIDO-RS: the studies since a date, with a modality; as plain dicts of the fields a worklist shows."""
    import requests

    filters = {}
    if since:
        filters["StudyDate"] = since_date(since)
    if modality:
        filters["ModalitiesInStudy"] = modality
    try:
        found = client(url, **auth).search_for_studies(search_filters=filters)
    except requests.RequestException as exc:
        raise MedaiError(_failure("QIDO-RS search at", url, exc)) from None
    out = []
    for item in found:
        ds = pydicom.Dataset.from_json(item)
        out.append({"study_uid": str(ds.get("StudyInstanceUID", "")), "date": str(ds.get("StudyDate", "")),
                    "modalities": list(ds.get("ModalitiesInStudy", []) or []),
                    "accession": str(ds.get("AccessionNumber", "")), "description": str(ds.get("StudyDescription", ""))})
    return out


def retrieve_study(url: str, study_uid: str, **auth: str) -> list[bytes]:
    """WADO-RS: every instance of a study, as DICOM file bytes."""
    import io

    import requests

    try:
        datasets = client(url, **auth).retrieve_study(study_uid)
    except requests.RequestException as exc:
        raise MedaiError(_failure(f"WADO-RS retrieve of study {study_uid} from", url, exc)) from None
    out = []
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out
