"""Access control and the Analyze page in a real browser (run with `make e2e`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from medai.auth import LOGIN_FAILED
from medai.store import Store
from tests.conftest import need
from tests.e2e.conftest import PASSWORD, USERS, fill_sign_in, session_cookie, settle, shot, sign_in

pytestmark = pytest.mark.e2e

PAGE_URLS = ["", "analyze", "history", "models", "users", "train", "metrics", "backup", "login"]
NAV = {"admin": {"Analyze", "History", "PACS", "Models", "Train", "Metrics", "Backup", "Users"},
       "researcher": {"Analyze", "History", "Models", "Train", "Metrics"},
       "radiologist": {"Analyze", "History", "PACS", "Models", "Metrics"}}
ALL_TITLES = {"Analyze", "History", "PACS", "Models", "Users", "Train", "Metrics", "Backup"}


def test_first_run_creates_the_admin_who_then_signs_in(fresh_server, page):
    page.goto(fresh_server)
    page.get_by_text("Set up MedAI CXR").wait_for()
    assert not page.get_by_role("button", name="Sign in").count()  # no user yet: set-up, not sign-in
    page.get_by_label("Administrator username").fill("chief")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat password").fill(PASSWORD + "x")
    page.get_by_role("button", name="Create administrator").click()
    page.get_by_text("The two passwords differ.").wait_for()
    page.get_by_label("Repeat password").fill(PASSWORD)
    page.get_by_role("button", name="Create administrator").click()
    page.get_by_text("Signed in as chief").wait_for()
    shot(page, "first_run")
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Sign in").wait_for()  # set-up is offered only while no user exists
    assert not page.get_by_text("Set up MedAI CXR").count()
    fill_sign_in(page, "chief", PASSWORD)
    page.get_by_text("Signed in as chief").wait_for()
    # the first account is an administrator: the Users page is offered
    expect(page.locator('[data-testid="stSidebar"] [data-testid="stPageLink"]', has_text="Users")).to_have_count(1)


@pytest.mark.parametrize("user", ["rad1", "nobody"])
def test_wrong_password_or_unknown_user_gets_the_same_generic_error(server, page, user):
    page.goto(server)
    fill_sign_in(page, user, PASSWORD + "wrong")
    page.get_by_text(LOGIN_FAILED).wait_for()
    body = page.locator("body").inner_text()
    assert "Signed in as" not in body and "unknown" not in body.lower()
    assert page.get_by_role("button", name="Sign in").count() == 1


@pytest.mark.parametrize("path", PAGE_URLS)
def test_signed_out_every_page_url_shows_only_the_sign_in(server, page, path):
    page.goto(f"{server}/{path}")
    page.get_by_role("button", name="Sign in").wait_for()
    settle(page)
    headings = set(page.locator("h1").all_inner_texts())
    assert not (headings & ALL_TITLES), headings
    body = page.locator("body").inner_text()
    for secret in ("Audit log", "Chest X-rays (PNG", "Model card", "Open analysis", "Start training"):
        assert secret not in body
    # the sidebar lists no page names while signed out
    assert not page.locator('[data-testid="stSidebarNav"], [data-testid="stPageLink"]').count()


@pytest.mark.parametrize("user", sorted(USERS))
def test_each_role_sees_its_pages_and_cannot_open_others_by_url(server, page, user):
    role = USERS[user]
    sign_in(page, server, user)
    link_locator = page.locator('[data-testid="stSidebar"] [data-testid="stPageLink"]')
    expect(link_locator).to_have_count(len(NAV[role]))  # the sidebar may still be rendering: wait for it
    settle(page)
    links = set(link_locator.all_inner_texts())
    assert {link.strip().split("\n")[-1] for link in links} == NAV[role]  # text = icon name + title
    if role != "admin":
        sign_in(page, server, user, path="users")  # a URL visit is a new Streamlit session: same user (cookie)
        body = page.locator("body").inner_text()
        assert "Audit log" not in body and "New user" not in body
        sign_in(page, server, user, path="backup")
        assert "Create backup" not in page.locator("body").inner_text()
    if role == "researcher":
        sign_in(page, server, user, path="pacs")
        assert "Urgent findings first" not in page.locator("body").inner_text()
    if role == "radiologist":
        sign_in(page, server, user, path="pacs")
        expect(page.get_by_text("Urgent findings first")).to_be_visible()
        assert "PACS endpoints" not in page.locator("body").inner_text()
        sign_in(page, server, user, path="train")
        assert "Start training" not in page.locator("body").inner_text()


def choose_method(page, method: str) -> None:
    """Pick a heatmap method on Analyze and wait for its map's caption."""
    page.get_by_label("Method", exact=True).click()
    page.get_by_role("option", name=method, exact=True).click()
    page.get_by_text(f"{method} heatmap for Cardiomegaly", exact=True).wait_for(timeout=120_000)
    settle(page)


def test_radiologist_analyzes_real_xrays(server, e2e_home, page):
    """The default chest model is the 14-finding NIH one: an NIH film with cardiomegaly and a real DICOM."""
    film = need("nih-cxr14-sample/fullres/00000211_000.png")  # NIH: Cardiomegaly
    dicom = need("dicom/siim_cxr_pa_mono2.dcm")
    sign_in(page, server, "rad1")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(film), str(dicom)])
    page.get_by_text("2 images").wait_for(timeout=120_000)
    page.get_by_text("heatmap for").first.wait_for(timeout=120_000)
    body = page.locator("body").inner_text()
    assert "Findings" in body and film.name in body  # the first image is selected for exploring
    # the heatmap's finding menu offers the positive findings, the most probable first
    page.get_by_label("Finding", exact=True).click()
    offered = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    assert offered[0] == "Cardiomegaly" and "NORMAL" not in offered, offered
    # switch the heatmap method: a new CAM is computed and shown
    caption = page.get_by_text(re.compile(r"^[\w+]+ heatmap for Cardiomegaly$")).first
    caption.wait_for()
    default = caption.inner_text().split()[0]
    other = "eigencam" if default != "eigencam" else "gradcam"
    choose_method(page, other)
    with page.expect_download() as download:
        page.get_by_role("button", name="Overlay PNG").click()
    assert download.value.suggested_filename == f"{film.stem}_overlay.png"
    assert Path(download.value.path()).read_bytes().startswith(b"\x89PNG")
    with page.expect_download() as download:
        page.get_by_role("button", name="PDF report").click()
    assert download.value.suggested_filename.endswith("_report.pdf")
    assert Path(download.value.path()).read_bytes().startswith(b"%PDF")
    choose_method(page, default)  # the README's screenshot shows what a reader sees first
    shot(page, "analyze")
    history = Store(e2e_home / "data" / "medai.db").history(username="rad1")
    assert {e.file_name for e in history} == {film.name, dicom.name}
    assert all(e.result["model"]["name"] == "nih14-efficientnet-lite0" for e in history)


def test_researcher_trains_a_tiny_model_and_sees_curves_then_metrics(server, page):
    need("pneumoniamnist")
    sign_in(page, server, "res1")
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.locator('[data-testid="stPageLink"]', has_text="Train").click()
    page.get_by_role("heading", name="Train", exact=True).wait_for()
    sidebar.get_by_label("Recipe (defaults)").click()
    page.keyboard.type("pneumoniamnist")  # the list is long and drawn only in part: filter it, as a user would
    page.get_by_role("option", name="hybrid_pneumoniamnist").click()
    sidebar.locator('input[aria-label="Run name"][value="hybrid-pneumoniamnist"]').wait_for()  # its defaults
    expect(sidebar.get_by_label("Run name", exact=True)).to_have_count(1)  # the old recipe's form is gone
    for label, value in (("Run name", "e2e-tiny"), ("Image size (px)", "32"), ("Epochs", "2")):
        field = sidebar.get_by_label(label, exact=True)
        field.fill(value)
        field.press("Tab")
    sidebar.get_by_role("button", name="Start training").click()
    page.get_by_text("Started e2e-tiny").wait_for()
    page.locator('[data-testid="stMetricValue"]', has_text="finished").wait_for(timeout=240_000)
    page.locator(".js-plotly-plot").first.wait_for()
    shot(page, "train")
    page.get_by_label("Model name").fill("e2e-tiny-model")
    page.get_by_role("button", name="Register as model").click()
    page.get_by_text(re.compile(r"Registered e2e-tiny-\S+ as e2e-tiny-model")).wait_for()
    # the run table refreshed with the panel: finished, 100%, registered (it said 'running, 0%' before)
    table = page.locator('[data-testid="stMain"] [data-testid="stDataFrame"]').first
    expect(table).to_contain_text("e2e-tiny-model", timeout=30_000)
    sidebar.locator('[data-testid="stPageLink"]', has_text="Metrics").click()
    page.get_by_role("heading", name="Metrics", exact=True).wait_for()
    page.get_by_text("ROC", exact=True).first.wait_for(timeout=120_000)
    shot(page, "metrics")


def test_admin_creates_a_radiologist_who_can_sign_in(server, browser, page):
    sign_in(page, server, "admin1")
    page.locator('[data-testid="stSidebar"] [data-testid="stPageLink"]', has_text="Users").click()
    page.get_by_role("heading", name="Users", exact=True).wait_for()
    form = page.locator('[data-testid="stForm"]').first
    form.get_by_label("Username").fill("rad2")
    form.get_by_label("Initial password").fill(PASSWORD)
    form.get_by_label("Initial password").press("Tab")
    form.get_by_role("button", name="Create user").click()
    page.get_by_text("Created radiologist 'rad2'.").wait_for()
    # the table and the 'change a user' list show the new account at once (they missed it before)
    expect(page.locator('[data-testid="stDataFrame"]').first).to_contain_text("rad2")
    page.get_by_label("User", exact=True).click()
    page.get_by_role("option", name="rad2").wait_for()
    page.keyboard.press("Escape")
    other = browser.new_context().new_page()
    sign_in(other, server, "rad2")
    assert "Signed in as rad2" in other.locator("body").inner_text()
    other.context.close()


def test_a_reload_or_second_tab_keeps_the_session_and_sign_out_ends_it_everywhere(server, page):
    """Was: F5 signed you out. The session cookie finds the user again; signing out deletes the session
    on the server, so the same cookie, replayed, signs nobody in."""
    sign_in(page, server, "rad1")
    page.reload()
    page.get_by_text("Signed in as rad1").wait_for()
    second = page.context.new_page()
    second.goto(f"{server}/history")
    second.get_by_text("Signed in as rad1").wait_for()
    cookie = session_cookie(page)
    second.close()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Sign in").wait_for()
    page.context.add_cookies([{k: cookie[k] for k in ("name", "value", "domain", "path")}])  # replayed
    page.reload()
    page.get_by_role("button", name="Sign in").wait_for()
    settle(page)
    assert "Signed in as" not in page.locator("body").inner_text()


def test_admin_creates_and_verifies_a_backup(server, page):
    sign_in(page, server, "admin1")
    page.locator('[data-testid="stSidebar"] [data-testid="stPageLink"]', has_text="Backup").click()
    page.get_by_role("heading", name="Backup", exact=True).wait_for()
    page.get_by_role("button", name="Create backup").click()
    page.get_by_text("Created and verified").wait_for(timeout=120_000)
    page.get_by_role("button", name="Verify").click()
    page.get_by_text("files match their SHA-256").wait_for()
    shot(page, "backup")


def _kermany(n: int) -> list[Path]:
    val = need("kermany-pneumonia/val")
    return sorted((val / "PNEUMONIA").glob("*.jpeg"))[:n // 2] + sorted((val / "NORMAL").glob("*.jpeg"))[:n - n // 2]


def test_removing_files_after_selecting_a_batch_row_does_not_crash(server, page):
    """Was: 6 images, select row 5, remove files with the x -> 'This app has encountered an error'."""
    files = _kermany(6)
    sign_in(page, server, "rad1")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(f) for f in files])
    page.get_by_text("6 images").wait_for(timeout=180_000)
    settle(page)
    grid = page.locator('[data-testid="stDataFrame"]').first
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 12, box["y"] + 35 * 5 + 35 + 17)  # the row-selection cell of row 5 (0-based)
    page.get_by_role("heading", name=files[5].name).wait_for(timeout=120_000)
    settle(page)
    for _ in range(4):  # remove files with the uploader's x
        page.locator('[data-testid="stFileChipDeleteBtn"]').last.click()
        settle(page)
    assert not page.locator('[data-testid="stException"]').count()
    assert "encountered an error" not in page.locator("body").inner_text()
    page.get_by_text("2 images").wait_for(timeout=120_000)


def test_score_cam_says_its_cost_and_does_not_stick_to_the_next_image(server, page):
    """Was: choosing Score-CAM once kept it for every later image and model (a 200 s spinner)."""
    first, second = _kermany(2)
    sign_in(page, server, "rad1")
    uploader = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
    uploader.set_input_files([str(first)])
    page.get_by_text("heatmap for").first.wait_for(timeout=120_000)
    settle(page)
    page.get_by_label("Method", exact=True).click()
    page.get_by_role("option", name="scorecam (slow)").click()
    page.get_by_text("Score-CAM runs the model once per feature map").wait_for(timeout=60_000)
    page.get_by_role("button", name=re.compile(r"^Compute scorecam for ")).wait_for()
    settle(page)
    page.locator('[data-testid="stFileChipDeleteBtn"]').last.click()  # remove the first image
    settle(page)
    uploader.set_input_files([str(second)])
    page.get_by_role("heading", name=second.name).wait_for(timeout=120_000)
    settle(page)
    assert "Score-CAM runs the model" not in page.locator("body").inner_text()
    assert "scorecam" not in page.get_by_label("Method", exact=True).inner_text()
