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

MODEL = SHIPPED_MODELS_DIR / "pneumonia-hybrid.safetensors"
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
        pytest.skip("the shipped pneumonia-hybrid model is absent")
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
    assert {"name": "pneumonia-hybrid", "default": True}.items() <= next(
        m for m in ok.json() if m["name"] == "pneumonia-hybrid").items()
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
    assert [(c["username"], c["detail"]["status"]) for c in calls[:2]] == [(None, 401), ("rad1", 200)]
    assert token not in json.dumps(store.audit_log())


def test_png_and_dicom_analyse_like_the_cli_predict(client, token):
    png = sorted(need("nih-cxr14-sample/fullres").glob("*.png"))[0]
    dicom = need("dicom/siim_cxr_pa_mono2.dcm")
    cli = json.loads(run_cli("predict", "--checkpoint", str(MODEL), str(png), str(dicom), "--json",
                             check=True).stdout)
    for path, expected in zip((png, dicom), cli):
        resp = client.post("/api/analyze", headers=bearer(token), params={"heatmaps": "true"},
                           files={"file": (path.name, path.read_bytes())})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert body["thresholds"] == pytest.approx(expected["thresholds"])
        assert body["findings"] == expected["findings"]
        exp = body["explanation"]
        assert exp["anatomy"]["applicable"]  # frontal chest X-rays: lungs and heart found
        ctr = exp["cardiothoracic_ratio"]["ctr"]
        assert 0.3 < ctr < 0.75
        (label, images), = body["heatmaps"].items()
        assert label in exp["attention_shares"]
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
    assert_json_error(post({"file": ("a.jpeg", real)}, findings="Cardiomegaly"), 422, "bad_request")
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
    resp = client.post("/api/analyze/batch", headers=bearer(token), files=files, params={"explain": "false"})
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
    assert [c["detail"]["status"] for c in store.audit_log(action="api_call")] == [401, 200]
