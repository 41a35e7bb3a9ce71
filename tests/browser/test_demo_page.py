"""The demo page (`/demo`) in real headless Chromium against the live stack: it buys, follows the
status over server-sent events and reaches `confirmed`, answering a hold when the event holds; it
stays on server-sent events as streams end and reopen, follows a `failed` purchase on until it is
decided, does not loop on long-polls answered at once, and keeps asking (same key) when a retry
is refused while its first try may still be queued, and stops asking about a purchase the API
answers 404 for.

Chromium is Debian's (`.ci/run` installs it); playwright drives it, with no browser download."""

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit
from uuid import UUID

import asyncpg
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Request, Route, async_playwright

from shared.messages import PurchaseRequested
from shared.purchases.models import FailReason
from shared.purchases.repository import record_failed_purchases
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


async def record_failed(db: asyncpg.Pool, page: Page, event_id: str) -> None:
    """Record the page's purchase `failed`, as the dead-letter recorder does when its message is
    dead-lettered. The message itself stays queued here, so a worker started later decides the
    purchase, as it would once an operator replays the message."""
    body = await page.evaluate("purchase")
    requested = PurchaseRequested(
        purchase_id=UUID(body["purchase_id"]),
        event_id=UUID(event_id),
        customer_id=body["customer_id"],
        quantity=body["quantity"],
        accepted_at=datetime.fromisoformat(body["accepted_at"]),
    )
    async with db.acquire() as conn:
        await record_failed_purchases(conn, [requested], reason=FailReason.DELIVERY_LIMIT_EXCEEDED)


async def test_the_demo_page_shows_a_failed_purchase_as_not_processed_yet_and_follows_it_on(
    settings: Settings, db: asyncpg.Pool, start_worker: StartWorker, browser: Browser
) -> None:
    """`failed` is not final (a replay of its message decides the purchase): the page tells the
    buyer it could not be processed yet, keeps its stream, and shows the decision when it
    comes."""
    async with served_api(settings) as api:
        created = await create_event(api, total_tickets=10)
        page = await browser.new_page()
        await page.goto(f"{api.base_url}/demo?{urlencode({'event': created['id'], 'buy': '1'})}")
        await page.wait_for_selector('#status[data-status="pending"]', timeout=30_000)

        await record_failed(db, page, created["id"])
        await page.wait_for_selector('#status[data-status="failed"]', timeout=30_000)
        assert await page.inner_text("#status") == (
            "could not be processed yet (delivery_limit_exceeded)"
        )

        await start_worker()
        await page.wait_for_selector('#status[data-status="confirmed"]', timeout=30_000)
        assert "long-polling" not in await page.inner_text("#log")


@pytest.mark.parametrize("settings", [{"status_max_waiters": 0}], indirect=True)
async def test_the_demo_page_long_polls_a_server_that_answers_at_once_without_a_loop(
    settings: Settings, db: asyncpg.Pool, start_worker: StartWorker, browser: Browser
) -> None:
    """Past its bound of held requests (0 here) a server answers every long-poll at once: the
    page then asks again after `Retry-After` while the purchase is pending, and only every
    FAILED_PAUSE_S (10 s) once it failed, and still sees the purchase decided after that."""
    async with served_api(settings) as api:
        created = await create_event(api, total_tickets=10)
        page = await browser.new_page()
        polls: list[str] = []

        def seen(request: Request) -> None:
            if "wait=" in request.url:
                polls.append(request.url)

        page.on("request", seen)
        # No event stream gets through: the page long-polls.
        await page.route("**/events", lambda route: route.abort())
        await page.goto(f"{api.base_url}/demo?{urlencode({'event': created['id'], 'buy': '1'})}")
        await page.wait_for_function(
            "document.getElementById('log').textContent.includes('long-polling')", timeout=30_000
        )

        await asyncio.sleep(3)
        pending_polls = len(polls)
        assert 1 <= pending_polls <= 5, f"{pending_polls} long-polls in about 3 s while pending"

        await record_failed(db, page, created["id"])
        await page.wait_for_selector('#status[data-status="failed"]', timeout=30_000)
        failed_at = len(polls)
        await asyncio.sleep(5)
        assert len(polls) - failed_at <= 1, "a failed purchase was asked about again at once"

        await start_worker()
        await page.wait_for_selector('#status[data-status="confirmed"]', timeout=30_000)


async def test_the_demo_page_keeps_asking_when_a_retry_is_refused_after_its_first_try_was_queued(
    settings: Settings, start_worker: StartWorker, browser: Browser
) -> None:
    """The first try is queued by one replica and its answer lost; the retry (same key) reaches
    another replica after the sales closed, which refuses it (409). That does not prove the first
    try was not queued: the page says the outcome is not known yet and asks again with the same
    key, which gets the purchase once a worker has recorded it, bought once."""
    async with served_api(settings) as first, served_api(settings) as second:
        created = await create_event(first, total_tickets=10)
        event_id = created["id"]
        keys: list[str] = []

        async def lose_the_answer_then_ask_the_other_replica(route: Route) -> None:
            keys.append(route.request.headers["idempotency-key"])
            if len(keys) == 1:
                queued = await route.fetch()
                assert queued.status == 202, await queued.text()
                closed = await first.patch(
                    f"/events/{event_id}", json={"sales_end_at": datetime.now(UTC).isoformat()}
                )
                assert closed.status_code == 200, closed.text
                await route.abort("connectionreset")
            else:
                path = urlsplit(route.request.url).path
                await route.fulfill(response=await route.fetch(url=f"{second.base_url}{path}"))

        page = await browser.new_page()
        await page.route("**/tickets/purchase", lose_the_answer_then_ask_the_other_replica)
        await page.goto(f"{first.base_url}/demo?{urlencode({'event': event_id, 'buy': '1'})}")

        status = await page.wait_for_selector(
            '#status[data-status="unknown"], #status[data-status="refused"]', timeout=30_000
        )
        assert status is not None
        assert await status.get_attribute("data-status") == "unknown", await page.inner_text("#log")
        problem = await page.inner_text("#problem")
        assert "Sales closed" in problem
        assert "may still be queued" in problem
        await start_worker()
        await page.wait_for_selector('#status[data-status="confirmed"]', timeout=60_000)

        assert len(keys) >= 3
        assert set(keys) == {keys[0]}, "every ask must carry the first try's Idempotency-Key"
        assert await page.inner_text("#problem") == ""
        available = (await first.get(f"/events/{event_id}")).json()["available_tickets"]
        assert available == 9


async def test_a_purchase_still_503_after_its_retries_is_asked_about_again_with_its_key(
    settings: Settings, start_worker: StartWorker, browser: Browser
) -> None:
    """A 503 may come for a purchase the broker took after all: after its ten tries the page
    does not call it refused and forget its key (Buy again would then buy twice), but says the
    outcome is not known and asks about it, with the same key, when Buy is pressed again."""
    async with served_api(settings) as api:
        created = await create_event(api, total_tickets=10)
        await start_worker()
        keys: list[str] = []
        unavailable = {
            "type": "urn:ticketing:problem:service-unavailable",
            "title": "Service unavailable",
            "status": 503,
            "detail": "The message broker did not confirm the purchase in time.",
        }

        async def unavailable_ten_times(route: Route) -> None:
            keys.append(route.request.headers["idempotency-key"])
            if len(keys) <= 10:
                await route.fulfill(
                    status=503,
                    headers={"Retry-After": "0"},
                    content_type="application/problem+json",
                    body=json.dumps(unavailable),
                )
            else:
                await route.continue_()

        page = await browser.new_page()
        await page.route("**/tickets/purchase", unavailable_ten_times)
        await page.goto(f"{api.base_url}/demo?{urlencode({'event': created['id'], 'buy': '1'})}")

        await page.wait_for_selector('#status[data-status="unknown"]', timeout=30_000)
        assert "Service unavailable" in await page.inner_text("#problem")
        await page.click("#buy-button")
        await page.wait_for_selector('#status[data-status="confirmed"]', timeout=30_000)

        assert len(keys) == 11
        assert set(keys) == {keys[0]}, "asking again must carry the same Idempotency-Key"
        available = (await api.get(f"/events/{created['id']}")).json()["available_tickets"]
        assert available == 9


async def test_the_demo_page_stops_asking_about_a_purchase_the_api_never_issued(
    settings: Settings, browser: Browser
) -> None:
    """A 404 to a status request will not change by asking again. Here the status requests reach
    a replica given another PURCHASE_ID_SECRET than the one that queued the purchase (a
    misconfigured deployment): the page shows the problem and stops asking, rather than asking
    once a second for as long as it is open."""
    misconfigured = settings.model_copy(update={"purchase_id_secret": "another-secret"})
    async with served_api(settings) as first, served_api(misconfigured) as second:
        created = await create_event(first, total_tickets=10)
        asked: list[str] = []

        async def ask_the_misconfigured_replica(route: Route) -> None:
            asked.append(route.request.url)
            parts = urlsplit(route.request.url)
            elsewhere = f"{second.base_url}{parts.path}" + (
                f"?{parts.query}" if parts.query else ""
            )
            await route.fulfill(response=await route.fetch(url=elsewhere))

        page = await browser.new_page()
        await page.route("**/purchases/**", ask_the_misconfigured_replica)
        await page.goto(f"{first.base_url}/demo?{urlencode({'event': created['id'], 'buy': '1'})}")

        await page.wait_for_function(
            "document.getElementById('log').textContent.includes('stopped asking')",
            timeout=30_000,
        )
        assert "not found" in (await page.inner_text("#problem")).lower()
        assert any("wait=" in url for url in asked), "the page should have long-polled"
        asked_before = len(asked)
        await asyncio.sleep(3)
        assert len(asked) == asked_before, f"asked again: {asked[asked_before:]}"
        assert await page.get_attribute("#status", "data-status") == "pending"
