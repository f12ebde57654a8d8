"""A real browser against a real ``streamlit run dashboard.py``: Debian's chromium driven by Playwright.

The server runs on a free loopback port with a fresh temporary MEDAI_HOME (its own database). Screenshots
go to ``results/e2e/`` (git-ignored; CI keeps them as artefacts) unless ``MEDAI_E2E_SHOTS`` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MEDAI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
PASSWORD = "correct horse battery"
USERS = {"admin1": "admin", "res1": "researcher", "rad1": "radiologist"}
SHOTS = Path(os.environ.get("MEDAI_E2E_SHOTS", ROOT / "results" / "e2e"))


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"streamlit did not become healthy at {url} within {timeout} s")


def _medai(env: dict[str, str], *args: str, stdin: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "medai", *args], cwd=ROOT, env=env, input=stdin, text=True, check=True,
                   capture_output=True)


@pytest.fixture(scope="session")
def e2e_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-home")


@contextlib.contextmanager
def dashboard(home: Path) -> Iterator[str]:
    """``streamlit run dashboard.py`` on a free loopback port with ``home`` as MEDAI_HOME; yields its URL."""
    with dashboard_process(home) as (url, _proc):
        yield url


@contextlib.contextmanager
def dashboard_process(home: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """As :func:`dashboard`, yielding the server process too (to kill it)."""
    env = {**os.environ, "MEDAI_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    env.pop("MEDAI_ADMIN_PASSWORD", None)
    port = free_port()
    log = open(home / "streamlit.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        _stop_jobs(home)


@pytest.fixture(scope="session")
def server(e2e_home: Path) -> Iterator[str]:
    """URL of a dashboard with one user per role already created."""
    env = {**os.environ, "MEDAI_HOME": str(e2e_home), "PYTHONWARNINGS": "ignore"}
    for user, role in USERS.items():
        _medai(env, "users", "add", user, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")
    with dashboard(e2e_home) as url:
        yield url


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[str]:
    """URL of a dashboard over an empty home: no user exists yet (first run)."""
    with dashboard(tmp_path) as url:
        yield url


def _stop_jobs(home: Path) -> None:
    """Training jobs are their own processes (they outlive the dashboard on purpose): stop the suite's."""
    import signal

    from medai.store import Store

    for run in Store(home / "data" / "medai.db").runs(("running",)):
        try:
            os.kill(run["pid"], signal.SIGTERM)
        except (ProcessLookupError, TypeError):
            pass


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file() and not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make e2e` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # tall enough that the Analyze page fits (Streamlit scrolls inside its own container, not the page)
    context = browser.new_context(viewport={"width": 1400, "height": 2000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page, url: str, user: str, path: str = "") -> None:
    """Open ``path`` signed in as ``user``: a browser that signed in before keeps its session (cookie),
    otherwise the sign-in form is filled."""
    page.goto(f"{url}/{path}")
    form, signed_in = page.get_by_role("button", name="Sign in"), page.get_by_text(f"Signed in as {user}")
    deadline = time.monotonic() + 90
    while not (form.count() and form.first.is_visible()) and not (signed_in.count() and signed_in.first.is_visible()):
        assert time.monotonic() < deadline, page.locator("body").inner_text()[:2000]
        page.wait_for_timeout(250)
    if path:  # a page this session's navigation does not offer: Streamlit says so in a dialog
        try:
            page.get_by_text("Page not found").wait_for(timeout=3000)
            page.keyboard.press("Escape")
            page.get_by_role("dialog").wait_for(state="hidden")
        except PlaywrightTimeout:
            pass
    if form.count() and form.first.is_visible():
        fill_sign_in(page, user, PASSWORD)
    page.get_by_text(f"Signed in as {user}").wait_for()
    settle(page)  # the run that sets the session cookie: a click during it can be lost
    session_cookie(page)


def choose_model(page, name: str) -> None:
    """Pick a model in the Analyze sidebar (the 14-finding NIH chest model is the default)."""
    page.locator('[data-testid="stSidebar"]').get_by_label("Model", exact=True).click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} - ")).click()
    settle(page)


def session_cookie(page, timeout_s: float = 30) -> dict:
    """The session cookie, once the browser has it: a zero-height component writes it after the run that
    signed in, so a reload straight after sign-in (faster than any person) could go out without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [c for c in page.context.cookies() if c["name"] == "medai_session" and c["value"]]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "the session cookie was never written"
        page.wait_for_timeout(100)


def fill_sign_in(page, user: str, password: str) -> None:
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()


def settle(page) -> None:
    """Wait until no script run is in progress (the app root's ``data-test-script-state``). Call it after
    waiting for something the run started by the last interaction shows: right after a click the new run
    may not have begun yet."""
    page.locator('[data-testid="stApp"]:not([data-test-script-state="running"])').wait_for(timeout=120_000)
