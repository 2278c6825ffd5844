"""The dashboard in a real browser: Debian's Chromium, headless, driven through chromedriver by selenium,
against ``python app.py run`` (the embedded broker and SQLite, a tokens file).

Feeds fixtures through the ingest, signs in, sees the incidents grouped, filters by service, opens one
and reads its timeline, clicks Acknowledge and waits until the page (refreshing itself) shows the
status the worker applied, toggles dark mode, and checks a title carrying ``<script>`` shows as text.
With ``INCIDENTD_SCREENSHOTS=docs/img`` it saves the README's screenshots there.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.api.conftest import INGEST_TOKEN, TOKENS, WRITE_TOKEN, WRITER, bearer
from tests.ingest.conftest import eventually
from tests.ingest.processes import app_process
from tests.services import require

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FIXTURES = Path(__file__).parent.parent / "fixtures"
EVIL = "<script>window.pwned = 1</script> disk full on <b>db-1</b>"
pytestmark = [pytest.mark.integration, pytest.mark.slow]

INCIDENTS = [  # (title, service, environment, severity): with the fixture's two checkout alerts
    ("Payments API p99 latency above 2s", "payments", "production", "high"),
    ("Payments webhook backlog growing", "payments", "production", "medium"),
    ("Search index lagging 15 minutes", "search", "production", "low"),
    ("Search cluster yellow", "search", "staging", "medium"),
    (EVIL, "storage", "production", "critical"),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium through chromedriver, with a fresh profile; fails in CI when missing."""
    require(
        CHROMIUM.exists() and CHROMEDRIVER.exists(), "chromium and chromedriver", "bash .ci/install-api.sh"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


async def post(url: str, token: str, body: bytes) -> int:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=bearer(token)) as r:
        return r.status


async def listed(base: str) -> list[dict[str, Any]]:
    url = f"{base}/v1/incidents?limit=200"
    async with aiohttp.ClientSession() as session, session.get(url, headers=bearer(WRITE_TOKEN)) as response:
        return list((await response.json())["items"])


def wait(driver: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page replaces its content when the data changed: an element found a moment ago may be gone.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=ignored).until(condition)


def shot(driver: Any, tmp_path: Path, name: str) -> None:
    """A screenshot in the test's directory, copied to INCIDENTD_SCREENSHOTS when set (docs/img)."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    target = os.environ.get("INCIDENTD_SCREENSHOTS")
    if target:
        shutil.copy(path, Path(target) / name)


async def test_dashboard_in_chromium(browser: Any, tmp_path: Path) -> None:
    """Grouped, filtered, an incident's timeline, Acknowledge applied by the worker and shown by the
    self-refreshing page, dark mode toggled and kept, and a title with <script> shown as text."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    env = {"INCIDENTD_SQLITE_PATH": str(tmp_path / "incidents.db"), "INCIDENTD_BROKER": "memory",
           "INCIDENTD_HTTP_TOKENS_FILE": str(tokens), "INCIDENTD_HTTP_DASHBOARD_REFRESH": "2"}  # fmt: skip
    async with app_process("run", env, tmp_path / "run.log") as running:
        base = running.http
        assert (
            await post(
                f"{base}/v1/alertmanager", INGEST_TOKEN, (FIXTURES / "alertmanager_firing.json").read_bytes()
            )
            == 202
        )
        for title, service, environment, severity in INCIDENTS:
            body = {"title": title, "service": service, "environment": environment, "severity": severity}
            assert (
                await post(f"{base}/v1/commands/incident.create", WRITE_TOKEN, json.dumps(body).encode())
                == 202
            )
        await eventually(lambda: _count(base, 2 + len(INCIDENTS)))

        def run(call: Any, *args: Any) -> Any:  # selenium blocks: off the event loop
            return asyncio.to_thread(call, *args)

        # Sign in.
        await run(browser.get, f"{base}/")
        await run(wait, browser, lambda d: d.find_elements(By.ID, "token"))
        browser.find_element(By.ID, "token").send_keys(WRITE_TOKEN)
        browser.find_element(By.ID, "sign-in").click()
        await run(wait, browser, lambda d: d.find_elements(By.ID, "open-total"))

        # Grouped by service, then severity, with counts.
        assert browser.find_element(By.ID, "open-total").text == "7"
        services = [
            s.get_attribute("data-service") for s in browser.find_elements(By.CSS_SELECTOR, "section.group")
        ]
        assert services == ["checkout", "payments", "search", "storage"]
        payments = browser.find_element(By.CSS_SELECTOR, 'section[data-service="payments"]')
        assert [h.text for h in payments.find_elements(By.TAG_NAME, "h3")] == ["high 1", "medium 1"]
        shot(browser, tmp_path, "dashboard.png")

        # The <script> title is text: shown literally, never run.
        storage = browser.find_element(By.CSS_SELECTOR, 'section[data-service="storage"] a.title')
        assert storage.text == EVIL
        assert browser.execute_script("return window.pwned === undefined") is True
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - raises when there is no alert

        # Filter by service: kept in the URL, only that service shown.
        Select(browser.find_element(By.NAME, "service")).select_by_visible_text("search")
        browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
        await run(wait, browser, lambda d: "service=search" in d.current_url)
        shown = [
            s.get_attribute("data-service") for s in browser.find_elements(By.CSS_SELECTOR, "section.group")
        ]
        assert shown == ["search"]
        assert browser.find_element(By.ID, "open-total").text == "2"

        # Open an incident: its timeline.
        browser.find_element(By.LINK_TEXT, "Search cluster yellow").click()
        await run(wait, browser, lambda d: d.find_elements(By.ID, "timeline"))
        entries = browser.find_elements(By.CSS_SELECTOR, "#timeline li.entry")
        assert "opened" in entries[0].text and "oncall-alice" in entries[0].text  # the token's name
        assert browser.find_element(By.ID, "status").text == "open"

        # Acknowledge: the worker applies it; the page, refreshing itself, shows it (no reload here).
        browser.find_element(By.ID, "acknowledge").click()
        await run(wait, browser, lambda d: "sent=incident.acknowledge" in d.current_url)
        await run(wait, browser, lambda d: d.find_element(By.ID, "status").text == "acknowledged")
        last = browser.find_elements(By.CSS_SELECTOR, "#timeline li.entry")[-1].text
        assert "acknowledged" in last and WRITER in last
        assert not browser.find_elements(By.ID, "acknowledge")  # no second Acknowledge
        shot(browser, tmp_path, "incident.png")

        # Dark mode: follows the OS (light here), the toggle switches it, and it stays on the next page.
        background = "return getComputedStyle(document.body).backgroundColor"
        light = browser.execute_script(background)
        browser.find_element(By.ID, "theme-toggle").click()
        assert browser.execute_script("return document.documentElement.dataset.theme") == "dark"
        assert browser.execute_script(background) != light
        await run(browser.get, f"{base}/")
        await run(wait, browser, lambda d: d.find_elements(By.ID, "open-total"))
        assert browser.execute_script(background) != light
        shot(browser, tmp_path, "dashboard-dark.png")
        assert await running.stop() == 0


async def _count(base: str, expected: int) -> bool:
    return len(await listed(base)) == expected
