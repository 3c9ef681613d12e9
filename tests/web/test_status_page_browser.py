"""Headless Chromium (Debian's, driven by selenium through Debian's chromedriver; nothing is
downloaded) shows the status page of a 3-site testbed of real processes; one site is killed
with SIGKILL and the page, refreshing itself, shows it down within the failure-detection
time (``down_after``). A screenshot is saved in the test's folder."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from p2pacs.control.client import RUNFILE
from p2pacs.testbed import Testbed, free_port, wait_for

from web_helpers import PASSWORD, USER, enable_web, spki_pin

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DOWN_AFTER = 3.0  # seconds: the testbed's failure-detection time
REFRESH = 0.5  # seconds between the page's own refreshes
PHONE = (390, 844)  # CSS pixels of a phone's screen
SLACK = 3.0  # seconds allowed beyond DOWN_AFTER + REFRESH on a loaded machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None or shutil.which("chromedriver") is None,
        reason="Debian's chromium and chromium-driver are not installed (make debs)",
    ),
]


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[tuple[Testbed, Path]]:
    names = ["clinic-a", "clinic-b", "clinic-c"]
    with Testbed(tmp_path / "fed", names, down_after=DOWN_AFTER, repair_interval=1.0) as bed:
        cert, _ = enable_web(bed["clinic-a"].site, port=free_port(), refresh=REFRESH)
        bed.start()
        yield bed, cert


@pytest.fixture
def chromium(tmp_path: Path, bed: tuple[Testbed, Path]) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, cert = bed
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        # trust exactly the site's certificate (self-signed for the test), nothing else
        f"--ignore-certificate-errors-spki-list={spki_pin(cert)}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _states(driver: object) -> dict[str, str]:
    """Member -> state as the page shows it now (read in one script: the page replaces its
    content every REFRESH seconds, so element handles go stale)."""
    rows = driver.execute_script(  # type: ignore[attr-defined]
        "return Array.from(document.querySelectorAll('tr.member'))"
        ".map(r => [r.dataset.name, r.dataset.state])"
    )
    return dict(rows)


def test_page_shows_a_killed_site_down(
    bed: tuple[Testbed, Path], chromium: object, tmp_path: Path
) -> None:
    testbed, _ = bed
    driver = chromium
    a = testbed["clinic-a"]
    host, port = json.loads((a.path / RUNFILE).read_text())["web"]
    url = f"https://{host}:{port}/"
    basic = aiohttp.encode_basic_auth(USER, PASSWORD)
    driver.execute_cdp_cmd("Network.enable", {})  # type: ignore[attr-defined]
    driver.execute_cdp_cmd(  # type: ignore[attr-defined]
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": basic}}
    )
    driver.execute_cdp_cmd(  # type: ignore[attr-defined]  # a phone's screen
        "Emulation.setDeviceMetricsOverride",
        {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 1, "mobile": True},
    )
    driver.get(url)  # type: ignore[attr-defined]
    assert driver.title == "clinic-a - p2pacs"  # type: ignore[attr-defined]
    # the page's own script runs under its Content-Security-Policy: it marks the page live
    assert wait_for(
        lambda: driver.execute_script("return typeof tick") == "function",  # type: ignore[attr-defined]
        10,
    )
    assert wait_for(lambda: _states(driver) == {"clinic-b": "up", "clinic-c": "up"}, 30, 0.2), (
        _states(driver)
    )
    testbed["clinic-c"].kill()
    killed = time.monotonic()
    # the page refreshes itself: no reload from here on
    assert wait_for(lambda: _states(driver).get("clinic-c") == "down", 30, 0.1), _states(driver)
    seen_down = time.monotonic() - killed
    assert seen_down <= DOWN_AFTER + REFRESH + SLACK, f"shown down after {seen_down:.1f} s"
    assert _states(driver)["clinic-b"] == "up"
    cards = driver.execute_script(  # type: ignore[attr-defined]
        "return document.querySelector('.cards').innerText"
    )
    assert "sites down\n1" in cards and "sites up\n2" in cards
    shot = tmp_path / "status-page.png"
    assert driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width = driver.execute_script(  # type: ignore[attr-defined]
        "return document.documentElement.scrollWidth"
    )
    assert width <= PHONE[0], f"the page is {width} px wide on a {PHONE[0]} px phone screen"
