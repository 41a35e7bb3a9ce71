"""The demo page (`/demo`) in real headless Chromium against the live stack: it buys, follows the
status over server-sent events and reaches `confirmed`, answering a hold when the event holds.

Chromium is Debian's (`.ci/run` installs it); playwright drives it, with no browser download."""

import asyncio
import shutil
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Request, async_playwright

from shared.settings import Settings
from tests.api.helpers import served_api
from tests.conftest import StartWorker
from tests.factories import create_event

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
)


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.mark.parametrize(
    ("event", "page_params", "seen"),
    [
        ({}, {}, "confirmed"),
        ({"hold_seconds": 600}, {"hold": "confirm"}, "confirmed"),
        ({"hold_seconds": 600}, {"hold": "cancel"}, "cancelled"),
    ],
)
async def test_the_demo_page_buys_and_follows_the_purchase_to_its_outcome(
    settings: Settings,
    start_worker: StartWorker,
    browser: Browser,
    event: dict[str, int],
    page_params: dict[str, str],
    seen: str,
) -> None:
    async with served_api(settings) as api:
        created = await create_event(api, total_tickets=10, **event)
        await start_worker()
        page = await browser.new_page()
        query = urlencode(
            {"event": created["id"], "customer": "browser", "buy": "1", **page_params}
        )
        await page.goto(f"{api.base_url}/demo?{query}")

        await page.wait_for_selector(f'#status[data-status="{seen}"]', timeout=30_000)

        log = await page.inner_text("#log")
        assert "status pending" in log
        if event:
            assert "status held" in log
        assert "long-polling" not in log, "server-sent events should have carried the status"
        assert await page.inner_text("#problem") == ""
        available = (await api.get(f"/events/{created['id']}")).json()["available_tickets"]
        assert available == (9 if seen == "confirmed" else 10)


async def test_the_demo_page_shows_a_refusal_as_the_problem_says(
    settings: Settings, browser: Browser
) -> None:
    async with served_api(settings) as api:
        created = await create_event(api, sales_start_at="2099-01-01T00:00:00Z")
        page = await browser.new_page()
        await page.goto(f"{api.base_url}/demo?{urlencode({'event': created['id'], 'buy': '1'})}")

        await page.wait_for_selector('#status[data-status="refused"]', timeout=30_000)
        assert "Sales not open" in await page.inner_text("#problem")


@pytest.mark.parametrize("settings", [{"status_stream_max_s": 1.0}], indirect=True)
async def test_the_demo_page_stays_on_server_sent_events_when_each_stream_ends(
    settings: Settings, start_worker: StartWorker, browser: Browser
) -> None:
    """The server ends every stream after STATUS_STREAM_MAX_S and EventSource reopens it with
    `Last-Event-ID`, which sends no event while nothing changed: a stream that opened is not a
    failure, so the page neither falls back to long-polling nor misses the outcome."""
    async with served_api(settings) as api:
        created = await create_event(api, total_tickets=10)
        page = await browser.new_page()
        streams: list[str] = []
        polls: list[str] = []
        enough = asyncio.Event()  # four streams opened, or the page long-polls

        def seen(request: Request) -> None:
            if request.url.endswith("/events"):
                streams.append(request.url)
            elif "wait=" in request.url:
                polls.append(request.url)
            if len(streams) >= 4 or polls:
                enough.set()

        page.on("request", seen)
        await page.goto(f"{api.base_url}/demo?{urlencode({'event': created['id'], 'buy': '1'})}")
        await page.wait_for_selector('#status[data-status="pending"]', timeout=30_000)

        # No worker yet: the purchase stays pending while streams end and reopen, event-less.
        await asyncio.wait_for(enough.wait(), 30)
        assert polls == [], f"long-polling after {len(streams)} streams that all opened"
        await start_worker()
        await page.wait_for_selector('#status[data-status="confirmed"]', timeout=30_000)

        assert "long-polling" not in await page.inner_text("#log")
        assert polls == []
