"""Talking to a PACS that fails, against real servers on loopback. DICOMweb: one attempt per request (the
delivery queue retries with its own backoff; a search answers at once when the PACS is down), and a message
that says what to check without the credentials or the server's error page. C-STORE: a connection attempt
that is never accepted ends at the node's timeout."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from medai.errors import MedaiError
from medai.pacs import network
from medai.pacs.work import Endpoint
from tests.test_pacs import dx_from_png

SECRET = "pw-Never-In-Messages-42"


class Server:
    """An HTTP server on a free loopback port that answers every request with ``status`` (or, with
    ``status=None``, never answers), counting the requests it got."""

    def __init__(self, status: int | None):
        outer = self
        self.requests = 0
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests += 1
                if status is None:
                    outer.release.wait(10)
                    return
                body = f"<html>error page {SECRET}</html>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request: pytest.FixtureRequest):
    srv = Server(request.param)
    yield srv
    srv.close()


@pytest.mark.parametrize("server, says", [
    (503, "HTTP 503 Service Unavailable"),  # the library would have retried this one 5 times
    (401, "HTTP 401 Unauthorized (check the DICOMweb user and password)"),
    (404, "HTTP 404 Not Found (check the DICOMweb root)"),
], indirect=["server"])
def test_a_search_fails_once_and_says_what_to_check(server: Server, says: str):
    with pytest.raises(MedaiError) as err:
        network.search_studies(server.url, "1d", username="reader", password=SECRET)
    assert str(err.value) == f"QIDO-RS search at {server.url} failed: {says}"
    assert server.requests == 1


def test_a_refused_connection_is_named_at_once():
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://reader:{SECRET}@127.0.0.1:{port}/dicom-web"
    with pytest.raises(MedaiError) as err:
        network.retrieve_study(url, "1.2.3")
    assert str(err.value) == (f"WADO-RS retrieve of study 1.2.3 from http://127.0.0.1:{port}/dicom-web failed: "
                              "could not connect (is the PACS running, and is the address right?)")


@pytest.mark.parametrize("server", [None], indirect=True)
def test_a_pacs_that_never_answers_times_out_after_one_wait(server: Server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(network, "TIMEOUT_S", 0.5)
    with pytest.raises(MedaiError, match=r"failed: no answer within 0.5 s$"):
        network.search_studies(server.url)
    assert server.requests == 1  # the library's retries would have come before it raised


def _instance(path: Path) -> Path:
    """A DX instance (the PACS tests' builder) of a small gradient image this test draws."""
    png = path.with_suffix(".png")
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(png)
    path.write_bytes(dx_from_png(png, generate_uid()))
    return path


@pytest.mark.parametrize("server", [503], indirect=True)
def test_a_failed_delivery_is_one_post_and_a_reason_for_the_worklist(server: Server, tmp_path: Path):
    endpoint = Endpoint(stow_url=server.url, auth={"username": "reader", "password": SECRET})
    with pytest.raises(network.SendError) as err:
        network.stow(endpoint, [_instance(tmp_path / "sr.dcm")])
    assert str(err.value) == f"STOW-RS to {server.url} failed: HTTP 503 Service Unavailable"
    assert server.requests == 1  # the queue schedules the retry (queue.BACKOFF_S), not the HTTP library


def test_a_c_store_to_a_pacs_that_never_accepts_gives_up_after_the_timeout(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    """A listener whose backlog is full drops the SYN, as a PACS behind a dead route or a firewall does: the
    association attempt has to end by the node's timeout, not after the kernel's ~2 minutes of SYN retries."""
    monkeypatch.setattr(network, "TIMEOUT_S", 1)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", port))  # fills the backlog
    errors: list[BaseException] = []

    def send() -> None:
        try:
            network.c_store(Endpoint(ae_title="PACS", host="127.0.0.1", port=port), [_instance(tmp_path / "sr.dcm")])
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    worker.join(20)
    first.close()
    listener.close()
    assert not worker.is_alive(), "the C-STORE association attempt is still waiting on the TCP connect"
    assert len(errors) == 1 and isinstance(errors[0], network.SendError)
    assert str(errors[0]) == (f"no association with PACS@127.0.0.1:{port} "
                              "(is the PACS running, and does it know this AE title?)")
