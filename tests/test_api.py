"""The HTTP API (medai.api) through FastAPI's test client, on real X-rays from ../shared/data."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from medai import auth
from medai.api import ApiSettings, RateLimiter, create_app
from medai.paths import SHIPPED_MODELS_DIR
from medai.store import Store
from tests.conftest import free_port, need, run_cli

MODEL = SHIPPED_MODELS_DIR / "nih14-efficientnet-lite0.safetensors"  # the default model
PASSWORD = "correct horse battery"


@pytest.fixture
def store(medai_home) -> Store:
    db = Store()
    auth.create_user(db, "rad1", PASSWORD, "radiologist")
    return db


@pytest.fixture
def token(store: Store) -> str:
    return auth.create_api_token(store, "rad1", "tests", actor="admin")[1]


def client_for(store: Store, **overrides) -> TestClient:
    return TestClient(create_app(ApiSettings(**overrides), store=store), raise_server_exceptions=False)


@pytest.fixture
def client(store: Store):
    if not MODEL.is_file():
        pytest.skip("the shipped default model is absent")
    with client_for(store) as c:  # `with` runs the lifespan: the default model is loaded
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def assert_json_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert "Traceback" not in resp.text
    return body


def test_health_is_open_and_reports_readiness(client):
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["ready"] and body["live"] and body["store"]
    assert body["models"]["loaded"] == 1 and body["models"]["available"] >= 1
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/analyze", "/api/analyze/batch",
                                                                    "/health", "/models", "/models/{name}"}


def test_health_is_not_ready_without_a_reachable_store(tmp_path, store):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the database folder should be")
    with client_for(Store(blocked / "medai.db")) as c:
        resp = c.get("/health")
    assert resp.status_code == 503 and resp.json()["store"] is False and resp.json()["live"] is True


def test_every_other_call_needs_a_valid_token(client, store, token):
    assert_json_error(client.get("/models"), 401, "unauthorized")
    assert client.get("/models").headers["www-authenticate"] == "Bearer"
    assert_json_error(client.get("/models", headers=bearer("medai_" + "x" * 43)), 401, "invalid_token")
    assert_json_error(client.get("/models", headers={"Authorization": f"Basic {token}"}), 401, "unauthorized")
    ok = client.get("/models", headers=bearer(token))
    assert ok.status_code == 200
    listed = {m["name"]: m for m in ok.json()}
    assert listed[MODEL.stem]["default"] and not listed["pneumonia-hybrid"]["default"]
    card = client.get(f"/models/{MODEL.stem}", headers=bearer(token)).json()["card"]
    assert len(card["labels"]) == 14 and "Cardiomegaly" in card["labels"]
    card = client.get("/models/pneumonia-hybrid", headers=bearer(token)).json()["card"]
    assert card["labels"] == ["NORMAL", "PNEUMONIA"]
    assert_json_error(client.get("/models/nope", headers=bearer(token)), 404, "unknown_model")


def test_a_revoked_token_or_disabled_user_is_refused(client, store, token):
    token_id = store.tokens("rad1")[0]["id"]
    assert client.get("/models", headers=bearer(token)).status_code == 200
    auth.revoke_api_token(store, token_id, actor="admin")
    assert_json_error(client.get("/models", headers=bearer(token)), 401, "invalid_token")
    _, second = auth.create_api_token(store, "rad1", "second", actor="admin")
    auth.set_disabled(store, "rad1", True, actor="admin1")
    assert_json_error(client.get("/models", headers=bearer(second)), 401, "invalid_token")


def test_tokens_are_stored_hashed_and_calls_audited(client, store, token):
    client.get("/models", headers=bearer(token))
    client.get("/models")
    for path in store.path.parent.glob("medai.db*"):  # the database and its WAL
        assert token.encode() not in path.read_bytes()
    assert "token_sha256" not in store.tokens()[0]
    calls = store.audit_log(action="api_call")
    assert [(c["username"], c["detail"]["status"]) for c in calls[:1]] == [("rad1", 200)]
    failed = store.audit_log(action="api_auth_failed")  # the call without a token, aggregated per address
    assert [(f["detail"]["count"], f["detail"]["codes"]) for f in failed] == [(1, {"unauthorized": 1})]
    assert token not in json.dumps(store.audit_log())


def test_png_and_dicom_analyse_like_the_cli_predict(client, token):
    png = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0]
    dicom = need("dicom/siim_cxr_pa_mono2.dcm")
    cli = json.loads(run_cli("predict", "--checkpoint", str(MODEL), str(png), str(dicom), "--json",
                             check=True).stdout)
    for path, expected in zip((png, dicom), cli):
        resp = client.post("/api/analyze", headers=bearer(token), params={"heatmaps": "true", "findings": "Effusion"},
                           files={"file": (path.name, path.read_bytes())})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert body["operating_points"] == pytest.approx(expected["operating_points"])
        assert body["thresholds"] == expected["thresholds"] and body["status"] == "analysed"
        assert body["findings"] == expected["findings"]
        exp = body["explanation"]
        assert exp["anatomy"]["applicable"]  # frontal chest X-rays: lungs and heart found
        ctr = exp["cardiothoracic_ratio"]["ctr"]
        assert 0.3 < ctr < 0.75
        (label, images), = body["heatmaps"].items()
        assert label == "Effusion" and label in exp["attention_shares"]
        assert sum(exp["attention_shares"][label].values()) == pytest.approx(1, abs=0.02)
        heat = Image.open(io.BytesIO(base64.b64decode(images["heatmap_png"])))
        overlay = Image.open(io.BytesIO(base64.b64decode(images["overlay_png"])))
        assert heat.mode == "L" and overlay.mode == "RGB"
        assert heat.size == overlay.size == (body["image"]["width"], body["image"]["height"])


def test_malformed_requests_get_4xx_json_errors(client, token):
    h = bearer(token)
    real = sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[0].read_bytes()
    post = lambda files, **params: client.post("/api/analyze", headers=h, files=files, params=params)  # noqa: E731
    assert_json_error(post({"file": ("a.png", b"")}), 422, "empty_file")
    assert_json_error(post({"file": ("a.png", b"\x00junk" * 50)}), 415, "unsupported_format")
    assert_json_error(post({"file": ("a.png", png_bytes(np.zeros((64, 64), np.uint8))[:60])}), 422, "bad_image")
    assert_json_error(post({"file": ("a.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00" * 40)}), 422, "bad_image")
    assert_json_error(post({"other": ("a.png", real)}), 422, "invalid_request")
    assert_json_error(post({"file": ("a.jpeg", real)}, model="nope"), 404, "unknown_model")
    assert_json_error(post({"file": ("a.jpeg", real)}, method="magic"), 422, "unknown_method")
    assert_json_error(post({"file": ("a.jpeg", real)}, findings="Tuberculosis"), 422, "bad_request")
    assert_json_error(post({"file": ("a.jpeg", real)}, opacity="2"), 422, "invalid_request")
    assert_json_error(client.get("/api/analyze", headers=h), 405, "method_not_allowed")
    assert_json_error(client.get("/nowhere", headers=h), 404, "not_found")
    ok = post({"file": ("../../etc/x.jpeg", real)}, explain="false")
    assert ok.status_code == 200 and ok.json()["file"] == "x.jpeg" and ok.json()["explanation"] is None


def test_upload_pixel_and_batch_limits(store, token):
    big = png_bytes((np.random.default_rng(0).random((1200, 1000)) * 255).astype(np.uint8))
    with client_for(store, max_upload_mb=0.5, max_pixels=1_000_000, max_batch=2) as c:
        h = bearer(token)
        assert_json_error(c.post("/api/analyze", headers=h, files={"file": ("big.png", big)}), 413,
                          "upload_too_large")
        wide = png_bytes(np.zeros((1100, 1000), np.uint8))  # small file, too many pixels once decoded
        assert_json_error(c.post("/api/analyze", headers=h, files={"file": ("wide.png", wide)}), 413,
                          "image_too_large")
        files = [("files", (f"{i}.png", wide)) for i in range(3)]
        assert_json_error(c.post("/api/analyze/batch", headers=h, files=files), 413, "too_many_files")
        resp = c.post("/api/analyze", headers={**h, "content-length": str(10**9)}, content=b"x")
        assert_json_error(resp, 413, "request_too_large")


def test_batch_reports_each_image(client, token):
    good = sorted(need("kermany-pneumonia/val/PNEUMONIA").glob("*.jpeg"))[:2]
    files = [("files", (p.name, p.read_bytes())) for p in good] + [("files", ("broken.png", b"not an image"))]
    resp = client.post("/api/analyze/batch", headers=bearer(token), files=files,
                       params={"explain": "false", "model": "pneumonia-hybrid"})
    assert resp.status_code == 200
    body = resp.json()
    assert (body["count"], body["failed"], body["model"]) == (3, 1, "pneumonia-hybrid")
    assert [r["file"] for r in body["results"]] == [good[0].name, good[1].name, "broken.png"]
    assert all(r["result"]["findings"] == ["PNEUMONIA"] for r in body["results"][:2])
    assert body["results"][2]["error"]["code"] == "unsupported_format"


def test_rate_limit_per_token(store, token):
    with client_for(store, rate_per_min=2) as c:
        codes = [c.get("/models", headers=bearer(token)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        resp = c.get("/models", headers=bearer(token))
        assert_json_error(resp, 429, "rate_limited")
        assert int(resp.headers["retry-after"]) >= 1
        other = auth.create_api_token(store, "rad1", "other", actor="admin")[1]
        assert c.get("/models", headers=bearer(other)).status_code == 200  # buckets are per token


def test_rate_limiter_refills():
    limiter = RateLimiter(per_min=60)
    assert all(limiter.acquire("t", now=0.0) == 0 for _ in range(60))
    assert limiter.acquire("t", now=0.0) == pytest.approx(1.0)
    assert limiter.acquire("t", now=1.0) == 0


def test_health_answers_and_queue_refuses_while_workers_are_busy(store, token):
    real = sorted(need("kermany-pneumonia/val/NORMAL").glob("*.jpeg"))[0].read_bytes()
    with client_for(store, workers=1, max_queue=1) as c:
        release = threading.Event()
        c.app.state.executor.submit(release.wait)  # the only worker is now busy
        results = {}
        waiting = threading.Thread(target=lambda: results.setdefault("first", c.post(
            "/api/analyze", headers=bearer(token), files={"file": ("a.jpeg", real)}, params={"explain": "false"})))
        waiting.start()
        try:
            health = threading.Thread(target=lambda: results.setdefault("health", c.get("/health")))
            health.start()
            health.join(60)
            assert not health.is_alive(), "/health waited for the inference pool"
            assert results["health"].status_code == 200
            for _ in range(600):  # until the first analysis waits for the worker
                if c.get("/health").json()["queue"]["pending"] == 1:
                    break
                time.sleep(0.05)
            busy = c.post("/api/analyze", headers=bearer(token), files={"file": ("b.jpeg", real)})
            assert_json_error(busy, 503, "busy")
            assert busy.headers["retry-after"]
        finally:
            release.set()
            waiting.join(120)
        assert results["first"].status_code == 200


GRADIENT = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=2048),
                         st.just(b"real"),
                         st.sampled_from([b"\x89PNG\r\n\x1a\n" + bytes(40), b"\xff\xd8\xff\xe0" + bytes(30),
                                          b"\x00" * 128 + b"DICM"])),
       name=st.text(max_size=40), model=st.one_of(st.none(), st.text(max_size=12)),
       findings=st.text(max_size=20), method=st.one_of(st.none(), st.text(max_size=10)),
       opacity=st.one_of(st.floats(allow_nan=True), st.text(max_size=5)),
       heatmaps=st.sampled_from(["true", "false", "maybe", ""]),
       auth_header=st.sampled_from(["good", "none", "garbage"]))
def test_fuzzed_requests_never_give_a_5xx(client, token, payload, name, model, findings, method, opacity, heatmaps,
                                          auth_header):
    payload = png_bytes(GRADIENT) if payload == b"real" else payload
    headers = {"good": bearer(token), "none": {}, "garbage": {"Authorization": "Bearer zz"}}[auth_header]
    params = {k: v for k, v in {"model": model, "findings": findings, "method": method, "opacity": str(opacity),
                                "heatmaps": heatmaps}.items() if v is not None}
    resp = client.post("/api/analyze", headers=headers, params=params, files={"file": (name or "x", payload)})
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert resp.json()["error"]["code"]


def test_medai_serve_answers_over_real_http(store, token, medai_home):
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medai", "serve", "--port", str(port)], cwd=MODEL.parents[1],
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        dicom = need("dicom/siim_cxr_pa_mono2.dcm")
        resp = httpx.post(f"{url}/api/analyze", headers=bearer(token), params={"explain": "false"},
                          files={"file": (dicom.name, dicom.read_bytes())}, timeout=120)
        assert resp.status_code == 200 and resp.json()["image"]["source_format"] == "dicom"
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
    finally:
        proc.terminate()
        proc.wait(15)
    assert [c["detail"]["status"] for c in store.audit_log(action="api_call")] == [200]
    assert [f["detail"]["count"] for f in store.audit_log(action="api_auth_failed")] == [1]


# ---- defects found from outside (issue 25): body cap before authentication, failed-token limits ----------

@pytest.fixture
def live_server(store: Store):
    """The API in uvicorn on a free loopback port (preload off: these calls never reach a model)."""
    import uvicorn

    app = create_app(ApiSettings(max_upload_mb=1, max_batch=1), store=store, preload=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield server.config.port
    server.should_exit = True
    thread.join(10)


def chunked_request(port: int, token: str | None):
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    auth_line = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(("POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                  f"Content-Type: multipart/form-data; boundary=xyz\r\n{auth_line}\r\n").encode())
    return sock


def read_answer(sock) -> str:
    """The response's head and JSON body (until the server closes or the body is complete)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            if length and len(body) >= length[0]:
                break
    finally:
        sock.close()
    return data.decode("latin-1")


def send_chunk(sock, size: int = 1 << 16) -> None:
    sock.sendall(f"{size:x}\r\n".encode() + b"\0" * size + b"\r\n")


def test_a_chunked_upload_without_a_token_is_refused_before_its_body_is_read(live_server: int):
    """Was: the whole body (2 GB in the report) was spooled to disk before the 401. Now the answer comes
    after the headers and one chunk, while the client has not finished (and never will)."""
    sock = chunked_request(live_server, None)
    send_chunk(sock)
    answer = read_answer(sock)  # times out (fails) if the server waits for the body

    assert answer.startswith("HTTP/1.1 401") and '"unauthorized"' in answer


def test_a_chunked_upload_is_cut_off_at_the_cap_while_it_streams(live_server: int, token: str):
    """With a valid token a chunked body has no Content-Length to refuse; it is counted as it arrives and
    answered 413 at the cap (2 MB here), not after the client has sent everything."""
    import select

    sock = chunked_request(live_server, token)
    part = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")  # a well-formed part, then endless bytes
    sent = 0
    while sent < 256 << 20 and not select.select([sock], [], [], 0)[0]:
        try:
            send_chunk(sock)
        except OSError:  # the server closed the connection after answering
            break
        sent += 1 << 16
    answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 413") and "request_too_large" in answer, answer[:300]
    assert sent < 32 << 20, f"{sent >> 20} MB went in before the answer (the loopback buffers hold a few MB)"


def test_failed_tokens_are_limited_per_address_and_audited_in_aggregate(store: Store):
    """Was: 600 random tokens gave 600 x 401 and 600 audit rows, and unauthenticated 404s wrote rows too."""
    with TestClient(create_app(ApiSettings(auth_failures_per_min=20), store=store, preload=False),
                    raise_server_exceptions=False) as c:
        codes = [c.get("/models", headers=bearer(f"medai_{i:043d}")).status_code for i in range(30)]
        assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}
        limited = c.get("/models", headers=bearer("medai_" + "y" * 43))
        assert int(limited.headers["retry-after"]) >= 1
        assert_json_error(limited, 429, "rate_limited")
        assert c.get("/no/such/path").status_code == 429  # still limited: no lookup, no row
    assert store.audit_log(action="api_call") == []
    rows = store.audit_log(action="api_auth_failed")
    assert len(rows) == 1 + 1  # the first failure at once, the rest counted and flushed at shutdown
    assert sum(r["detail"]["count"] for r in rows) == 20 and rows[0]["detail"]["client"] == "testclient"


def test_failure_audit_writes_one_row_per_address_and_window(store: Store):
    from medai.api.guard import FailureAudit

    audit = FailureAudit(store, window_s=60)
    audit.record("10.0.0.1", "invalid_token", "/models", now=0)
    for t in range(1, 6):
        audit.record("10.0.0.1", "invalid_token", "/models", now=t)
    audit.record("10.0.0.2", "unauthorized", "/x", now=2)
    assert [r["detail"]["count"] for r in store.audit_log(action="api_auth_failed")] == [1, 1]
    audit.record("10.0.0.1", "unauthorized", "/api/analyze", now=61)
    newest = store.audit_log(action="api_auth_failed")[0]["detail"]
    assert newest["count"] == 6 and newest["codes"] == {"invalid_token": 5, "unauthorized": 1}


def test_an_unauthenticated_404_is_a_401_and_writes_no_call_row(store: Store):
    with TestClient(create_app(ApiSettings(), store=store, preload=False), raise_server_exceptions=False) as c:
        assert_json_error(c.get("/no/such/path"), 401, "unauthorized")
    assert store.audit_log(action="api_call") == []


def test_a_truncated_png_error_names_the_file_not_python_internals(client, token):
    data = png_bytes((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))[:40]
    body = assert_json_error(client.post("/api/analyze", headers=bearer(token), files={"file": ("cut.png", data)}),
                             422, "bad_image")
    assert body["error"]["message"].startswith("cut.png: ") and "0x" not in body["error"]["message"]
    assert "BytesIO" not in body["error"]["message"]
