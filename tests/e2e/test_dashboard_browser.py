"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) opens ``/dashboard`` on a live server after a few
cached requests and reads the entries, the chart and the totals off the page, as an admin and as
a tenant. ``PROMPTCACHE_SCREENSHOT=<file>.png`` saves the admin view (docs/dashboard.png)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from promptcache.api.server import BackgroundServer
from promptcache.config import ApiConfig
from promptcache.engine.fake import FakeEngine
from promptcache.service import Service
from tests.conftest import make_config, words

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
KEYS = {"key-alice": "alice", "key-bob": "bob"}
ADMIN = "key-admin"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y ...)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def ask(server: BackgroundServer, key: str, system: str) -> None:
    body = {
        "model": "m",
        "max_tokens": 4,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    reply = httpx.post(f"{server.base_url}/v1/messages", json=body, headers=headers, timeout=60)
    reply.raise_for_status()


def open_page(driver: Any, server: BackgroundServer, key: str) -> dict[str, Any]:
    """Load the page with ``key``, wait for its first data, and read what it shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get(f"{server.base_url}/dashboard#key={key}")
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.body.dataset.loaded === '1'")
    )
    read = """
        const cells = (sel) => [...document.querySelectorAll(sel + ' tbody tr')]
            .map((tr) => [...tr.children].map((td) => td.textContent));
        const totals = {};
        for (const card of document.querySelectorAll('[data-total]'))
            totals[card.dataset.total] = card.querySelector('.v').textContent;
        return {
            entries: cells('#entries'), recent: cells('#recent'), misses: cells('#misses'),
            totals: totals, scope: document.getElementById('scope').textContent,
            lines: [...document.querySelectorAll('#chart polyline')].map(
                (p) => [p.getAttribute('class'), p.getAttribute('points').split(' ').length]),
            tiers: [...document.querySelectorAll('[data-tier]')].map((t) => t.textContent),
            address: location.href,
        };
    """
    page: dict[str, Any] = driver.execute_script(read)
    return page


def test_the_dashboard_shows_entries_chart_and_totals(
    browser: Any, live_server_factory: Callable[[Service], BackgroundServer]
) -> None:
    config = replace(make_config(), api=ApiConfig(api_keys=KEYS, admin_keys=frozenset({ADMIN})))
    server = live_server_factory(Service(FakeEngine(), config))
    shared, other = words(2000), words(2400, 5)
    for key, system in (
        ("key-alice", shared),
        ("key-alice", shared),
        ("key-alice", shared),
        ("key-bob", other),
    ):
        ask(server, key, system)

    admin = open_page(browser, server, ADMIN)
    assert admin["scope"] == "all tenants"
    assert "key=" not in admin["address"]  # the key leaves the address bar
    assert sorted(row[0] for row in admin["entries"]) == ["alice", "bob"]
    tokens = {row[0]: int(row[1].replace(",", "")) for row in admin["entries"]}
    assert tokens["bob"] > tokens["alice"] > 1024
    assert all(row[2] == "host" and row[3] == "5m" for row in admin["entries"])
    assert admin["entries"][0][4].startswith(("4:", "5:"))  # the TTL counting down
    assert admin["totals"]["requests"] == "4"
    assert admin["totals"]["hit rate"] == "50.0%"
    assert admin["totals"]["tokens read"] == f"{2 * tokens['alice']:,}"
    assert admin["totals"]["entries"] == "2"
    assert {cls for cls, _ in admin["lines"]} == {"hit-rate", "tokens-saved"}
    assert admin["misses"] == [["never_written", "2"]]
    assert len(admin["recent"]) == 4 and admin["recent"][0][1] == "bob"
    assert [row[5] for row in admin["recent"]] == ["miss", "hit", "hit", "miss"]
    assert admin["tiers"][0].startswith("host:")
    if target := os.environ.get("PROMPTCACHE_SCREENSHOT"):
        browser.save_screenshot(target)

    bob = open_page(browser, server, "key-bob")
    assert bob["scope"] == "tenant bob"
    assert [row[0] for row in bob["entries"]] == ["bob"]
    assert {row[1] for row in bob["recent"]} == {"bob"}
    assert bob["totals"]["requests"] == "1"
