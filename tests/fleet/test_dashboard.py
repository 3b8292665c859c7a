"""The dashboard in a real browser (Debian's chromium, driven by Playwright; no browser is
downloaded): a real fleet with real agents on a real Mosquitto, a rollout and a job moving on
the page as the fleet moves, the token taken from the URL fragment, device text never run as
HTML. Screenshots are kept under $EDGESDK_ARTEFACTS/dashboard (default: the system temp dir's
edgesdk-artefacts/dashboard), whose path the test prints; docs/dashboard.png is one of them."""

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
TOKEN = "dashboard-token-0123456789"


@pytest.fixture
def browser_page():
    """A page of Debian's chromium. A missing chromium fails the test: .ci/setup installs it."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (.ci/setup does: apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="en-US")  # 1,234 in numbers
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert errors == [], errors  # the page's script never threw


@pytest.fixture
def artefacts(capsys):
    folder = Path(os.environ.get("EDGESDK_ARTEFACTS") or Path(tempfile.gettempdir()) / "edgesdk-artefacts") / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\ndashboard screenshots: {folder}")
    return folder


def test_a_rollout_and_a_job_progress_on_the_dashboard(broker, make_link, make_fleet, make_api, eventually, digits_bundle,
                                                        digits_bundle_v2, digits, browser_page, artefacts, fleet_db) -> None:
    from playwright.sync_api import expect

    make_link("early", tags={"site": "berlin", "note": "<b>not bold</b>"}, preinstall=[digits_bundle.path])
    late_agent, late_link = make_link("late", tags={"site": "berlin", "role": "late"}, preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    late_link.stop()
    late_agent.stop()
    assert eventually(lambda: not next(d for d in fleet.devices() if d.id == "late").online)
    api = make_api(fleet, token=TOKEN, events_interval=0.2)

    page = browser_page
    page.goto(f"{api.base_url}/#token={TOKEN}")
    early, late = page.locator('[data-device="early"]'), page.locator('[data-device="late"]')
    expect(early.locator(".presence")).to_contain_text("online")
    expect(late.locator(".presence")).to_contain_text("offline")
    expect(early.locator(".models")).to_have_text("digits@1")
    expect(early).to_contain_text("note=<b>not bold</b>")  # device text shown as text, not run as HTML
    assert early.locator("b").count() == 0
    assert TOKEN not in page.url  # the token leaves the address bar (kept in the tab's sessionStorage)
    expect(page.locator("#live")).to_have_text("live")

    # a rollout to both: the canary (online) succeeds, the offline device waits
    rid = api.post("/api/v1/rollouts", files={"bundle": ("digits-2.edgebundle", digits_bundle_v2.path.read_bytes())},
                   data={"devices": "early,late", "canary": "1", "batch_percent": "100"}).json()["id"]
    rollout = page.locator(f'[data-rollout="{rid}"]')
    expect(rollout.locator(".count-SUCCEEDED")).to_have_text("SUCCEEDED 1/2", timeout=60_000)
    expect(rollout.locator(".count-QUEUED")).to_have_text("QUEUED 1/2")
    expect(rollout.locator(".state")).to_have_text("RUNNING")
    expect(early.locator(".models")).to_have_text("digits@2")

    # a job for the offline device only: no progress yet
    x = np.concatenate([digits.x_test] * 4)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    job = api.post("/api/v1/jobs", files={"inputs": ("digits.npz", buf.getvalue())},
                   data={"model": "digits", "to": "role=late", "batch_size": "50"}).json()
    row = page.locator(f'[data-job="{job["id"]}"]')
    expect(row.locator(".progress-text")).to_have_text(f"0/{len(x):,} (0%)")
    expect(row.locator(".state")).to_have_text("RUNNING")
    expect(page.locator("#totals")).to_contain_text("1/2 devices online · 1 rollouts running · 1 jobs running")
    assert "NaN" not in page.inner_text("body") and "undefined" not in page.inner_text("body")
    page.screenshot(path=str(artefacts / f"waiting-{fleet_db and 'postgresql' or 'sqlite'}.png"), full_page=True)

    # the device comes back: it takes the rollout, then the job's tasks; the page follows
    make_link("late", tags={"site": "berlin", "role": "late"})
    expect(late.locator(".presence")).to_contain_text("online", timeout=60_000)
    expect(rollout.locator(".state")).to_have_text("SUCCEEDED", timeout=60_000)
    expect(rollout.locator(".count-SUCCEEDED")).to_have_text("SUCCEEDED 2/2")
    expect(rollout.locator(".stage")).to_have_text(["canary 1/1 finished", "stage 1 1/1 finished"])
    expect(row.locator(".state")).to_have_text("SUCCEEDED", timeout=60_000)
    expect(row.locator(".progress-text")).to_have_text(f"{len(x):,}/{len(x):,} (100%)")
    points = page.locator("#throughput polyline")
    expect(points).to_have_count(1)
    assert int(points.get_attribute("data-points")) >= 1
    expect(page.locator("#chart-title")).to_contain_text(f"job {job['id']} (digits)")
    expect(late.locator(".models")).to_have_text("digits@2")
    expect(late.locator(".p50")).not_to_have_text("-", timeout=30_000)  # heartbeats after the job's requests
    assert "NaN" not in page.inner_text("body") and "undefined" not in page.inner_text("body")
    page.screenshot(path=str(artefacts / f"done-{fleet_db and 'postgresql' or 'sqlite'}.png"), full_page=True)


def test_the_page_asks_for_the_token_and_refuses_a_wrong_one(make_fleet, broker, make_api, browser_page) -> None:
    from playwright.sync_api import expect

    api = make_api(make_fleet(broker.url), token=TOKEN)
    page = browser_page
    page.goto(str(api.base_url))
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#token-input", "wrong-token-0123456789")
    page.click("#login button")
    expect(page.locator("#login-error")).to_contain_text("the token is not the one this fleet was started with")
    page.fill("#token-input", TOKEN)
    page.click("#login button")
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#devices-empty")).to_be_visible()
    expect(page.locator("#live")).to_have_text("live")
