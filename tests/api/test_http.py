"""HTTP-level behaviour: probes, body guards (size, JSON, media type), CORS, unknown routes and
methods, HEAD, and the OpenAPI document."""

import asyncio
import contextlib
import gc
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika.abc
import asyncpg
import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from api import cors, http_server
from api.main import cors_options, create_app
from api.openapi import render
from shared.purchases.changes import StatusWaiters
from shared.purchases.ids import PurchaseIds
from shared.purchases.models import Purchase
from shared.settings import Settings
from tests.api.helpers import assert_problem, record_purchase, served_api, total_depth
from tests.factories import create_event, event_body, purchase
from tests.faults.helpers import api_process
from tests.metrics import free_port, sample
from tests.worker.helpers import wait_for

MAX_BODY = 64 * 1024
OPENAPI_FILE = Path(__file__).resolve().parents[2] / "openapi.json"
ORIGIN = "https://shop.example"


def header_list(response: httpx.Response, name: str) -> set[str]:
    return {item.strip().lower() for item in response.headers.get(name, "").split(",") if item}


def padded_event_json(size: int) -> bytes:
    """A valid event body of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = json.dumps(event_body()).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def chunks(payload: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


# --- probes ---------------------------------------------------------------------------------


async def test_healthz_is_200(api: httpx.AsyncClient) -> None:
    response = await api.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_when_postgresql_and_rabbitmq_are_up(api: httpx.AsyncClient) -> None:
    response = await api.get("/readyz")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"postgresql": "ok", "rabbitmq": "ok"},
    }


async def test_readyz_is_503_problem_naming_itself_when_the_broker_is_down(
    settings: Settings,
) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await app.state.resources.publisher.close()  # the broker channel is gone

            response = await client.get("/readyz")

    problem = assert_problem(response, 503)
    assert problem["instance"] == "/readyz"
    assert "rabbitmq" in problem["detail"]
    assert response.headers["retry-after"] == "1"


# --- body size ------------------------------------------------------------------------------


async def test_body_of_exactly_64_kib_is_accepted(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/events", content=padded_event_json(MAX_BODY), headers={"content-type": "application/json"}
    )

    assert response.status_code == 201, response.text


async def test_body_over_64_kib_with_content_length_is_413(api: httpx.AsyncClient) -> None:
    payload = padded_event_json(MAX_BODY + 1)

    response = await api.post(
        "/events", content=payload, headers={"content-type": "application/json"}
    )

    assert response.request.headers["content-length"] == str(MAX_BODY + 1)
    assert assert_problem(response, 413)["instance"] == "/events"
    assert (await api.get("/events")).json()["items"] == []


async def test_streamed_body_over_64_kib_without_content_length_is_413(
    api: httpx.AsyncClient,
) -> None:
    response = await api.post(
        "/events",
        content=chunks(padded_event_json(MAX_BODY + 1)),
        headers={"content-type": "application/json"},
    )

    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert assert_problem(response, 413)["instance"] == "/events"
    assert (await api.get("/events")).json()["items"] == []


async def test_streamed_purchase_body_over_64_kib_is_413_and_publishes_nothing(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api)
    payload = json.dumps({"customer_id": "c" * (MAX_BODY + 10), "quantity": 1}).encode()

    response = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        content=chunks(payload),
        headers={"content-type": "application/json"},
    )

    assert_problem(response, 413)
    assert await total_depth(amqp, settings) == 0


async def test_small_streamed_body_is_accepted(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/events",
        content=chunks(json.dumps(event_body()).encode(), size=7),
        headers={"content-type": "application/json"},
    )

    assert "content-length" not in response.request.headers
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("declared", ["abc", "-1", "99999999999999999999"])
async def test_bogus_content_length_is_refused_not_500(
    api: httpx.AsyncClient, declared: str
) -> None:
    request = api.build_request(
        "POST", "/events", content=b"{}", headers={"content-type": "application/json"}
    )
    request.headers["content-length"] = declared

    response = await api.send(request)

    assert response.status_code in (400, 413), response.text
    assert_problem(response, response.status_code)


# --- request head size (the server python -m api runs) --------------------------------------


async def send_raw(port: int, head: bytes, *, pieces: int = 1, then: bytes = b"") -> bytes:
    """Send `head` in `pieces` writes (and `then` a moment later), until the server answers;
    what it answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(reader.read())  # until the server closes
    try:
        step = -(-len(head) // pieces)
        for start in range(0, len(head), step):
            if answer.done():
                break  # answered before all of it was sent
            with contextlib.suppress(ConnectionError):
                writer.write(head[start : start + step])
                await writer.drain()
            await asyncio.sleep(0.01)
        if then:
            await asyncio.sleep(0.3)
            with contextlib.suppress(ConnectionError):
                writer.write(then)
                await writer.drain()
        return await asyncio.wait_for(answer, 10)
    finally:
        answer.cancel()
        writer.close()


async def test_a_request_head_without_end_is_431_and_its_connection_closed(
    settings: Settings, tmp_path: Path
) -> None:
    """httptools keeps every header until the head ends: without a bound, one client sending
    headers without end takes the process's memory."""
    log = tmp_path / "api.log"
    with log.open("wb") as stderr:
        async with api_process(settings, timeout_s=30, stderr=stderr.fileno()) as (_, client):
            answers = await _heads_past_the_bound(client)
            counted = (await client.get("/metrics")).text
    (answer, answer_to_line, answer_to_line_past, answer_to_fields_past, behind, within, body) = (
        answers
    )

    for refused in (answer, answer_to_line, answer_to_line_past, answer_to_fields_past):
        assert_431(refused)
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["instance"] == "/healthz"
    # Behind a request on the same connection, the refusal comes after its answer.
    assert behind.startswith(b"HTTP/1.1 200 "), behind[:300]
    assert_431(behind[behind.index(b"HTTP/1.1 431") :])
    assert within.startswith(b"HTTP/1.1 200 "), within[:300]
    assert body.status_code == 201, body.text
    # Each refusal counted, like the app's answers (the process counted nothing else as 431).
    refusals = [
        sample(
            counted,
            "ticketing_http_requests_total",
            method=method,
            route=http_server.UNROUTED,
            status="431",
        )
        for method in ("GET", "unknown")
    ]
    assert sum(refusals) == 5, refusals
    logged = log.read_text()
    for trouble in ("Traceback", "Fatal error", "Exception in ASGI application"):
        assert trouble not in logged, logged[-2000:]


def assert_431(refused: bytes) -> None:
    status_line, _, rest = refused.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", refused[:300]
    head, _, content = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert b"content-type: application/problem+json" in head.lower()
    problem = json.loads(content)
    assert problem["status"] == 431
    assert problem["instance"].startswith("/")


async def _heads_past_the_bound(client: httpx.AsyncClient) -> list[Any]:
    """What the API answers to heads past the bound, sent every way, and to those within."""
    port = client.base_url.port
    assert port is not None
    endless = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-pad: %s\r\n" % (b"a" * 1000) * 400
    answer = await send_raw(port, endless, pieces=100)
    huge_line = b"GET /healthz?" + b"a" * 300_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
    answer_to_line = await send_raw(port, huge_line)
    # Just past the bound, sent whole: in reads that complete the head, and (a request line)
    # past what httptools can parse as a URL.
    line_past = b"GET /healthz?" + b"a" * 65_600 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
    answer_to_line_past = await send_raw(port, line_past)
    fields_past = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: %s\r\n\r\n" % (b"a" * 66_000)
    answer_to_fields_past = await send_raw(port, fields_past)
    # A head within the bound is served, and so is one followed by a body in the same read.
    within = await send_raw(
        port, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: %s\r\n\r\n" % (b"a" * 60_000)
    )
    body = await client.post(
        "/events",
        content=padded_event_json(MAX_BODY),
        headers={"content-type": "application/json", "x-pad": "a" * 30_000},
    )
    # A small head behind many small requests in one read is not refused: only its own bytes
    # count, not the read's.
    small = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(small * 6000 + b"GET /heal")
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(b"thz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    pipelined = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert pipelined.count(b"HTTP/1.1 200 ") == 6001, pipelined.count(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 431" not in pipelined
    fields = b"x-pad: %s\r\n" % (b"a" * 66_000)
    behind = await send_raw(
        port,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\n" + fields + b"\r\n",
    )
    return [
        answer,
        answer_to_line,
        answer_to_line_past,
        answer_to_fields_past,
        behind,
        within,
        body,
    ]


async def test_a_held_connection_costs_the_server_under_12_kb() -> None:
    """Ten thousand status streams are held at once (README, "Status to 10,000 waiters"): what the
    protocol keeps per connection, beyond uvicorn's own, is kept small. Measured with tracemalloc
    over 300 connections each holding a request (12.6 KB each with attributes instead of slots,
    a deque per event and per pipeline; 10.1 KB without, on Python 3.11)."""
    release = asyncio.Event()

    async def held(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await release.wait()
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            held,
            host="127.0.0.1",
            port=port,
            http=http_server.BoundedHeadProtocol,
            log_level="warning",
        )
    )
    serving = asyncio.create_task(server.serve())
    writers: list[asyncio.StreamWriter] = []

    async def hold() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")

    try:
        await wait_for(lambda: _started(server), timeout_s=30, what="uvicorn started")
        for _ in range(20):  # what the first connections allocate once
            await hold()
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.take_snapshot()
            for _ in range(300):
                await hold()
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    finally:
        release.set()
        for writer in writers:
            writer.close()
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
    # The server's side only: not this client's own streams.
    grown = sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if "asyncio/streams.py" not in str(stat.traceback)
    )

    assert grown / 300 < 12_000, grown / 300


async def test_a_request_that_does_not_arrive_in_time_is_408_or_closed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn times only the wait between two requests: without a bound, a connection that
    sends nothing, half a head or a body a byte at a time is held for good, and enough of them
    take every file descriptor the process has."""
    monkeypatch.setattr(http_server, "REQUEST_READ_TIMEOUT_S", 2.0)
    # Shorter than the timeout, as uvicorn's 5 s is than the 30 s one: a head begun behind an
    # answer must not be cut short by it.
    async with _served(settings, keep_alive_s=1) as port:
        counted_before = await _unrouted(port, 408)

        async def held(sent: bytes) -> bytes:
            """What the server answers to `sent` before it closes the connection."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(sent)
            try:
                return await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()

        silent, half_head, one_header, half_line, same_line, half_body = await asyncio.gather(
            held(b""),
            held(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: "),
            # A whole line and one header: the parser has delivered no header yet.
            held(b"GET /healthz HTTP/1.1\r\nhost: x\r\n"),
            # Half a line behind a whole request, in one read: no path can be named for it.
            held(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /heal"),
            # ... and the same path as the request before it, cut before its version.
            held(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz"),
            held(
                b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 1000\r\n\r\n{"
            ),
        )
        served = await held(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        counted = await _unrouted(port, 408)

    assert silent == b""
    # Counted like the app's answers, by method where the request line had arrived whole.
    assert (
        counted["GET"] - counted_before["GET"],
        counted["unknown"] - counted_before["unknown"],
    ) == (2, 2)
    for unfinished in (half_head, one_header):
        status_line, _, rest = unfinished.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout", unfinished[:300]
        problem = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert (problem["status"], problem["instance"]) == (408, "/healthz")
    for cut_short in (half_line, same_line):
        assert cut_short.startswith(b"HTTP/1.1 200 "), cut_short[:300]
        timed_out = cut_short[cut_short.index(b"HTTP/1.1 408") :]
        assert json.loads(timed_out.partition(b"\r\n\r\n")[2])["instance"] == "/"
    assert not half_body.startswith(b"HTTP/1.1 5"), half_body[:300]
    assert served.startswith(b"HTTP/1.1 200 "), served[:300]


async def test_a_connection_idle_past_the_keep_alive_timeout_is_closed_and_no_sooner(
    settings: Settings,
) -> None:
    """uvicorn's keep-alive timeout, kept by the sweep (no timer is armed per answer): an idle
    connection is closed within a fifth of the timeout after it, one that keeps asking is not,
    and neither is one whose next head has begun (it has the 408's longer bound)."""
    request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    async with _served(settings, keep_alive_s=1) as port:
        idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
        busy_reader, busy = await asyncio.open_connection("127.0.0.1", port)
        half_reader, half = await asyncio.open_connection("127.0.0.1", port)
        for writer in (idle, busy, half):
            writer.write(request)
        answered = asyncio.get_running_loop().time()
        for reader in (idle_reader, busy_reader, half_reader):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            await reader.readexactly(len(b'{"status":"ok"}'))
        half.write(b"GET /healthz HTTP/1.1\r\n")  # a head begun, never finished

        async def closed_after() -> tuple[bytes, float]:
            """What the idle connection reads until it is closed, and when that was."""
            rest = await idle_reader.read()
            return rest, asyncio.get_running_loop().time() - answered

        closing = asyncio.ensure_future(closed_after())
        for _ in range(5):  # 2 s of a request every 0.4 s
            await asyncio.sleep(0.4)
            busy.write(request)
            assert (await busy_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            await busy_reader.readexactly(len(b'{"status":"ok"}'))
        closed, idle_for = await asyncio.wait_for(closing, 5)
        busy_open, half_open = not busy_reader.at_eof(), not half_reader.at_eof()
        for writer in (idle, busy, half):
            writer.close()

    assert closed == b""
    assert 1.0 <= idle_for < 1.0 + 0.2 + 0.5, idle_for  # the timeout, a sweep, some slack
    assert busy_open
    assert half_open


async def test_a_request_that_is_not_http_is_a_400_problem_and_counted(
    settings: Settings,
) -> None:
    """uvicorn answers what httptools cannot parse with a plain-text 400 of its own: here it is
    a problem like every other error, after the answers before it, and counted."""
    async with _served(settings) as port:
        counted_before = await _unrouted(port, 400)
        not_http = await send_raw(port, b"NOT HTTP AT ALL\r\n\r\n")
        bad_header = await send_raw(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\nno colon\r\n\r\n")
        bad_length = await send_raw(
            port, b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: ten\r\n\r\n"
        )
        behind = await send_raw(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGARBAGE\r\n\r\n")
        # An absolute form without a path, which uvicorn cannot read.
        no_path = await send_raw(port, b"GET http://x HTTP/1.1\r\nhost: x\r\n\r\n")
        counted = await _unrouted(port, 400)
        other_versions = [
            await send_raw(port, b"GET /healthz" + version + b"\r\nhost: x\r\n\r\n")
            for version in (b" HTTP/2.0", b" HTTP/0.9", b"")
        ]
        http_1_0 = await send_raw(port, b"GET /healthz HTTP/1.0\r\n\r\n")

    assert _problem_closing(not_http, b"400 Bad Request")["instance"] == "/"
    assert _problem_closing(bad_header, b"400 Bad Request")["instance"] == "/healthz"
    assert _problem_closing(bad_length, b"400 Bad Request")["instance"] == "/events"
    assert behind.startswith(b"HTTP/1.1 200 "), behind[:300]
    refused = behind[behind.index(b"HTTP/1.1 400") :]
    assert _problem_closing(refused, b"400 Bad Request")["instance"] == "/"
    assert _problem_closing(no_path, b"400 Bad Request")["instance"] == "/"
    for answer in other_versions:
        problem = _problem_closing(answer, b"505 HTTP Version Not Supported")
        assert problem["instance"] == "/healthz"
    assert http_1_0.startswith(b"HTTP/1.1 200 "), http_1_0[:300]
    assert counted["GET"] - counted_before["GET"] == 2
    assert counted["POST"] - counted_before["POST"] == 1
    assert counted["unknown"] - counted_before["unknown"] == 2


async def test_a_request_without_one_valid_host_is_a_400_problem_and_counted(
    settings: Settings,
) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request without Host, with two, or with a value that names
    no host is a 400 (a problem, closing its connection, counted before routing); an HTTP/1.0
    request may omit Host, and every valid form is served."""
    async with _served(settings) as port:
        counted_before = await _unrouted(port, 400)
        refused = [
            await send_raw(port, b"GET /healthz HTTP/1.1\r\n" + fields + b"\r\n")
            for fields in (
                b"",
                b"host: a\r\nhost: a\r\n",
                b"host: a\r\nx-other: 1\r\nHost: b\r\n",
                b"host: a b\r\n",
                b"host: a/b\r\n",
                b"host: user@a\r\n",
                b"host: a:80:80\r\n",
                b"host: [::1\r\n",
            )
        ]
        counted = await _unrouted(port, 400)
        served = [
            await send_raw(
                port, b"GET /healthz HTTP/1.1\r\nhost: " + host + b"\r\nconnection: close\r\n\r\n"
            )
            for host in (b"a", b"api.example.com:8000", b"127.0.0.1:80", b"[::1]:8000", b"", b"a:")
        ]
        # The same valid host on every request of a connection, then a bad one: refused.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n" * 2)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: a b\r\n\r\n")
            kept = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    for answer in refused:
        assert _problem_closing(answer, b"400 Bad Request")["instance"] == "/healthz"
    assert counted["GET"] - counted_before["GET"] == len(refused)
    for answer in served:
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert kept.count(b"HTTP/1.1 200 ") == 2, kept[:600]
    assert _problem_closing(kept[kept.index(b"HTTP/1.1 400") :], b"400 Bad Request")


async def test_a_body_that_is_not_http_is_a_400_at_once_and_its_request_ends(
    settings: Settings,
) -> None:
    """A chunked body httptools cannot read belongs to the request being served: it is answered
    at once (not behind that same request, which would wait for a body that never comes), and
    the app sees its client leave."""
    head = (
        b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    async with _served(settings) as port:
        async with asyncio.timeout(5):
            bad_size = await send_raw(port, head + b"zz\r\n{}\r\n0\r\n\r\n")
            after_a_chunk = await send_raw(port, head + b"2\r\n{}\r\nzz\r\n")
            # Pipelined behind a request: answered after it, which is answered whole.
            behind = await send_raw(
                port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" + head + b"zz\r\n"
            )
            # In the body of a request already answered (415: not JSON): no second answer.
            answered = await send_raw(
                port,
                head.replace(b"application/json", b"text/plain") + b"2\r\n{}\r\n",
                then=b"zz\r\n",
            )
            # After the whole body of a request answered before it arrived: a head of its own.
            after_it = await send_raw(
                port,
                b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\n"
                b"content-length: 5\r\n\r\n",
                then=b"helloGARBAGE\r\n\r\n",
            )
        served = await send_raw(
            port, b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )

    for refused in (bad_size, after_a_chunk):
        assert _problem_closing(refused, b"400 Bad Request")["instance"] == "/events"
    assert behind.startswith(b"HTTP/1.1 200 "), behind[:300]
    refused_behind = behind[behind.index(b"HTTP/1.1 400") :]
    assert _problem_closing(refused_behind, b"400 Bad Request")["instance"] == "/events"
    assert answered.startswith(b"HTTP/1.1 415 "), answered[:300]
    assert answered.count(b"HTTP/1.1 ") == 1, answered
    assert after_it.startswith(b"HTTP/1.1 415 "), after_it[:300]
    _problem_closing(after_it[after_it.index(b"HTTP/1.1 400") :], b"400 Bad Request")
    assert served.startswith(b"HTTP/1.1 200 "), served[:300]


async def test_a_request_asking_to_switch_protocols_is_served_as_a_plain_one_or_refused(
    settings: Settings,
) -> None:
    """No protocol is switched to (RFC 9110 lets a server ignore Upgrade), but httptools reads
    nothing past such a head: one without a body is served and its connection closed; one with
    a body (curl --http2 sends `Upgrade: h2c`) is refused as a problem, never read as empty."""
    upgrade = b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n"
    websocket = (
        b"connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    async with _served(settings) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            event = await create_event(client)
        body = b'{"customer_id": "c", "quantity": 1}'
        purchase_head = (
            f"POST /events/{event['id']}/tickets/purchase HTTP/1.1\r\nhost: x\r\n".encode()
            + b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        )
        as_websocket = await send_raw(
            port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + websocket + b"\r\n"
        )
        as_h2c = await send_raw(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + upgrade + b"\r\n")
        no_body = await send_raw(
            port, b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 00\r\n" + upgrade + b"\r\n"
        )
        with_body = await send_raw(port, purchase_head + upgrade + b"\r\n" + body)
        behind = await send_raw(
            port,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" + purchase_head + upgrade + b"\r\n" + body,
        )

    for served in (as_websocket, as_h2c, no_body):
        assert served.startswith(b"HTTP/1.1 200 "), served[:300]
        assert b"connection: close" in served.partition(b"\r\n\r\n")[0].lower()
    assert "Upgrade" in _problem_closing(with_body, b"400 Bad Request")["detail"]
    assert behind.startswith(b"HTTP/1.1 200 "), behind[:300]
    _problem_closing(behind[behind.index(b"HTTP/1.1 400") :], b"400 Bad Request")


async def test_trailer_fields_are_dropped_not_taken_for_headers(settings: Settings) -> None:
    """Trailer fields come after a chunked body, once the request's headers were judged: uvicorn
    would append them to those headers, without bound. A key sent as a trailer is no key, and
    a trailer section larger than any head is read and dropped."""
    async with _served(settings) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            event = await create_event(client)

        async def with_trailers(trailers: bytes, *, pieces: int = 1) -> bytes:
            body = b'{"customer_id": "c", "quantity": 1}'
            return await send_raw(
                port,
                f"POST /events/{event['id']}/tickets/purchase HTTP/1.1\r\n".encode()
                + b"host: x\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + b"transfer-encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailers),
                pieces=pieces,
            )

        keyed = [await with_trailers(b"idempotency-key: k-1\r\n") for _ in range(2)]
        padded = await with_trailers(b"x-pad: %s\r\n" % (b"a" * 1000) * 60)
        # After `Connection: close` httptools drops what follows: the answer closes.
        closing = await send_raw(
            port,
            b"POST /events/%s/tickets/purchase HTTP/1.1\r\n" % event["id"].encode()
            + b"host: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            + b'23\r\n{"customer_id": "c", "quantity": 1}\r\n0\r\nconnection: close\r\n\r\n',
        )
        # One field without end, read piece by piece: refused as a head past the bound is.
        endless = await with_trailers(b"x-big: %s\r\n" % (b"a" * 200_000), pieces=40)

    for answer in (*keyed, padded, closing):
        assert answer.startswith(b"HTTP/1.1 202 "), answer[:300]
    assert b"connection: close" in closing.partition(b"\r\n\r\n")[0].lower()
    assert b"HTTP/1.1 431 " in endless, endless[:300]
    ids = {json.loads(answer.partition(b"\r\n\r\n")[2])["purchase_id"] for answer in keyed}
    assert len(ids) == 2, "a trailer was taken for the Idempotency-Key header"


def _problem_closing(answer: bytes, status: bytes) -> dict[str, Any]:
    """The problem `answer` carries, checked to be one with `status` that closes its connection."""
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 " + status, answer[:300]
    head, _, content = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    assert b"content-type: application/problem+json" in head.lower(), head
    problem: dict[str, Any] = json.loads(content)
    assert problem["status"] == int(status[:3])
    return problem


@contextlib.asynccontextmanager
async def _served(settings: Settings, *, keep_alive_s: int = 5) -> AsyncIterator[int]:
    """The app served in this process by the protocol `python -m api` serves with; its port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            http=http_server.BoundedHeadProtocol,
            timeout_keep_alive=keep_alive_s,
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: _started(server), timeout_s=30, what="uvicorn started")
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)


async def _unrouted(port: int, status: int) -> dict[str, float]:
    """The requests the server refused with `status` before routing, by method, as counted."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        text = (await client.get("/metrics")).text
    return {
        method: sample(
            text,
            "ticketing_http_requests_total",
            method=method,
            route=http_server.UNROUTED,
            status=str(status),
        )
        for method in ("GET", "POST", "unknown")
    }


async def _started(server: uvicorn.Server) -> bool:
    return server.started


# --- body syntax and media type -------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"{", b'{"name": "x",}', b"{'name': 'x'}", b"not json", b"   ", b'{"name": "x"} trailing'],
    ids=["truncated", "trailing-comma", "single-quotes", "bare-words", "whitespace", "trailer"],
)
async def test_malformed_json_is_400(api: httpx.AsyncClient, payload: bytes) -> None:
    response = await api.post(
        "/events", content=payload, headers={"content-type": "application/json"}
    )

    assert_problem(response, 400)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"name": "caf\xe9"}',
        b"[" * 20_000 + b"]" * 20_000,
    ],
    ids=["latin-1-not-utf-8", "nested-too-deep"],
)
async def test_a_body_json_cannot_read_is_the_same_malformed_json_on_every_route(
    api: httpx.AsyncClient, payload: bytes
) -> None:
    """The event routes (FastAPI reads their bodies) and the purchase routes (the contract
    reads them) call a body malformed JSON alike, whatever made json.loads give up."""
    answers = await _answers_of_every_body_route(api, payload)

    malformed = {
        "type": "urn:ticketing:problem:malformed-json",
        "title": "Malformed JSON",
        "detail": "The request body is not valid JSON.",
        "errors": [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}],
    }
    problems = {route: assert_problem(answer, 400) for route, answer in answers.items()}
    assert {
        route: {name: problem.get(name) for name in malformed}
        for route, problem in problems.items()
    } == dict.fromkeys(answers, malformed)


async def _answers_of_every_body_route(
    api: httpx.AsyncClient, payload: bytes
) -> dict[str, httpx.Response]:
    """What each route that reads a JSON body answers to `payload`."""
    event = await create_event(api)
    as_json = {"content-type": "application/json"}
    return {
        "POST /events": await api.post("/events", content=payload, headers=as_json),
        "PATCH /events/{id}": await api.patch(
            f"/events/{event['id']}", content=payload, headers=as_json
        ),
        "POST purchase": await api.post(
            f"/events/{event['id']}/tickets/purchase", content=payload, headers=as_json
        ),
    }


async def test_an_integer_of_more_digits_than_python_converts_is_422_on_every_route(
    api: httpx.AsyncClient,
) -> None:
    """Valid JSON that json.loads refuses (Python's limit on integer digits): a number out of
    range, as the README promises for any, not malformed JSON."""
    for digits in (4301, 5000):
        number = b"1" + b"0" * (digits - 1)
        answers = await _answers_of_every_body_route(api, b'{"total_tickets": ' + number + b"}")

        for route, answer in answers.items():
            problem = assert_problem(answer, 422)
            assert {
                "loc": ["body"],
                "msg": "A number has more than 4300 digits",
                "type": "number_too_long",
            } in problem["errors"], route


@pytest.mark.parametrize(
    ("headers", "coded"),
    [
        ([("content-type", "application/json; charset=iso-8859-1")], False),
        ([("content-type", "application/json; charset=utf-16")], False),
        ([("content-type", "application/json"), ("content-encoding", "gzip")], True),
        ([("content-type", "application/json"), ("content-encoding", "br")], True),
        ([("content-type", "application/json"), ("content-encoding", "identity, gzip")], True),
        (
            [
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
                ("content-encoding", "identity"),
            ],
            True,
        ),
    ],
    ids=["latin-1", "utf-16", "gzip", "brotli", "a list", "given twice"],
)
async def test_a_body_not_in_utf_8_or_compressed_is_415_on_every_route(
    api: httpx.AsyncClient, headers: list[tuple[str, str]], coded: bool
) -> None:
    """JSON is UTF-8 and no content coding is read: a body said to be otherwise would be
    misread (a latin-1 "café" as malformed JSON, a gzip label on a plain body ignored)."""
    event = await create_event(api)
    body = json.dumps({"customer_id": "c", "quantity": 1, **event_body()}).encode()
    answers = [
        await api.post("/events", content=body, headers=headers),
        await api.patch(f"/events/{event['id']}", content=body, headers=headers),
        await api.post(f"/events/{event['id']}/tickets/purchase", content=body, headers=headers),
    ]

    for answer in answers:
        assert_problem(answer, 415)
        # RFC 9110: a 415 for a content coding names the codings accepted.
        assert answer.headers.get("accept-encoding") == ("identity" if coded else None)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32-be", "utf-32"])
async def test_a_body_in_utf_16_or_32_is_malformed_json_on_every_route(
    api: httpx.AsyncClient, encoding: str
) -> None:
    """JSON is UTF-8 (RFC 8259). Python's json module would read these from their first bytes,
    which no route may do: the same body said to be UTF-16 is refused (415)."""
    event = await create_event(api, hold_seconds=600)
    body = json.dumps(
        {"customer_id": "c", "quantity": 1, "payment_reference": "p", **event_body()}
    ).encode(encoding)
    accepted = await purchase(api, event["id"])
    json_type = {"content-type": "application/json"}
    answers = [
        await api.post("/events", content=body, headers=json_type),
        await api.patch(f"/events/{event['id']}", content=body, headers=json_type),
        await api.post(f"/events/{event['id']}/tickets/purchase", content=body, headers=json_type),
        await api.post(
            f"/purchases/{accepted.json()['purchase_id']}/confirm", content=body, headers=json_type
        ),
        await api.post(
            f"/purchases/{accepted.json()['purchase_id']}/cancel", content=body, headers=json_type
        ),
    ]

    for answer in answers:
        assert assert_problem(answer, 400)["title"] == "Malformed JSON"


@pytest.mark.parametrize(
    ("content_type", "coding"),
    [
        ("application/json; charset=utf-8", "identity"),
        ('application/json; charset="UTF-8"', "identity"),
        ("application/json; charset=utf8", ""),
        ("application/json; charset=us-ascii", "identity, identity"),
    ],
)
async def test_a_body_said_to_be_utf_8_and_uncoded_is_read(
    api: httpx.AsyncClient, content_type: str, coding: str
) -> None:
    event = await create_event(api)
    headers = {"content-type": content_type, "content-encoding": coding}

    created = await api.post("/events", content=json.dumps(event_body()), headers=headers)
    bought = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        content=json.dumps({"customer_id": "c", "quantity": 1}),
        headers=headers,
    )

    assert created.status_code == 201, created.text
    assert bought.status_code == 202, bought.text


async def test_text_plain_body_is_415(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/events", content=json.dumps(event_body()), headers={"content-type": "text/plain"}
    )

    assert assert_problem(response, 415)["instance"] == "/events"


async def test_form_body_is_415(api: httpx.AsyncClient) -> None:
    response = await api.post("/events", data={"name": "x", "total_tickets": "5"})

    assert response.request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert_problem(response, 415)


async def test_multipart_body_is_415(api: httpx.AsyncClient) -> None:
    response = await api.post("/events", files={"file": ("event.json", b"{}")})

    assert_problem(response, 415)


async def test_body_without_content_type_is_415(api: httpx.AsyncClient) -> None:
    request = api.build_request("POST", "/events", content=json.dumps(event_body()).encode())
    request.headers.pop("content-type", None)

    response = await api.send(request)

    assert_problem(response, 415)


async def test_json_suffix_media_type_is_accepted(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/events",
        content=json.dumps(event_body()),
        headers={"content-type": "application/vnd.ticketing+json; charset=utf-8"},
    )

    assert response.status_code == 201, response.text


async def test_a_body_sent_to_cancel_is_judged_like_any_other_and_the_document_says_so(
    api: httpx.AsyncClient,
) -> None:
    """The request guard judges the body of every POST and PATCH before routing, so even cancel,
    which reads none, answers 413 and 415: its operation must declare them as the others do."""
    event = await create_event(api)
    accepted = await purchase(api, event["id"])
    cancel = f"/purchases/{accepted.json()['purchase_id']}/cancel"

    as_text = await api.post(cancel, content=b"please", headers={"content-type": "text/plain"})
    too_large = await api.post(
        cancel, content=b" " * (MAX_BODY + 1), headers={"content-type": "application/json"}
    )

    assert_problem(as_text, 415)
    assert_problem(too_large, 413)
    undeclared = [
        f"{method.upper()} {path}: {sorted({'413', '415'} - set(operation['responses']))}"
        for path, operations in json.loads(render())["paths"].items()
        for method, operation in operations.items()
        if method in ("post", "put", "patch") and not {"413", "415"} <= set(operation["responses"])
    ]
    assert undeclared == []


@pytest.mark.parametrize("body", [b"hello", b"{bad", b'{"a": 1'])
async def test_a_malformed_json_body_sent_to_cancel_is_400_and_cancels_nothing(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings, body: bytes
) -> None:
    """Cancel reads no body, but one labelled JSON that is not JSON is a client's mistake, as on
    every route, never a cancellation; a JSON body or none cancels."""
    event = await create_event(api)
    accepted = await purchase(api, event["id"])
    cancel = f"/purchases/{accepted.json()['purchase_id']}/cancel"

    malformed = await api.post(cancel, content=body, headers={"content-type": "application/json"})
    queued_after_it = await total_depth(amqp, settings)
    queued = await api.post(cancel, content=b"{}", headers={"content-type": "application/json"})
    blank = await api.post(cancel, content=b" \r\n", headers={"content-type": "application/json"})

    assert assert_problem(malformed, 400)["title"] == "Malformed JSON"
    assert queued_after_it == 1, "only the purchase is queued, no cancellation"
    assert queued.status_code == blank.status_code == 202, queued.text


@pytest.mark.parametrize("path", ["/events", "/events/{event_id}/tickets/purchase"])
async def test_missing_body_is_422_not_500(api: httpx.AsyncClient, path: str) -> None:
    event = await create_event(api)

    response = await api.post(path.format(event_id=event["id"]))

    assert_problem(response, 422)


@pytest.mark.parametrize("path", ["/events", "/events/{event_id}/tickets/purchase"])
@pytest.mark.parametrize(
    "content_types",
    [("text/plain", "application/json"), ("application/json", "text/plain")],
    ids=["json-last", "json-first"],
)
async def test_two_different_content_types_are_415_on_every_body_route(
    api: httpx.AsyncClient,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    path: str,
    content_types: tuple[str, str],
) -> None:
    """Which one describes the body cannot be told; read one way by the guard and the other by
    the parser, the same request was a 422 on one route and a 202 on another."""
    event = await create_event(api)
    body = {"customer_id": "c", "quantity": 1} if "purchase" in path else event_body()

    response = await api.post(
        path.format(event_id=event["id"]),
        content=json.dumps(body).encode(),
        headers=[("content-type", value) for value in content_types],
    )

    assert "Content-Type" in assert_problem(response, 415)["detail"]
    assert await total_depth(amqp, settings) == 0
    assert [item["id"] for item in (await api.get("/events")).json()["items"]] == [event["id"]]


async def test_the_same_content_type_given_twice_is_that_content_type(
    api: httpx.AsyncClient,
) -> None:
    response = await api.post(
        "/events",
        content=json.dumps(event_body()).encode(),
        headers=[("content-type", "application/json"), ("content-type", "application/json")],
    )

    assert response.status_code == 201, response.text


async def test_purchase_with_text_plain_is_415_and_publishes_nothing(
    api: httpx.AsyncClient, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    event = await create_event(api)

    response = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        content='{"customer_id": "c", "quantity": 1}',
        headers={"content-type": "text/plain"},
    )

    assert_problem(response, 415)
    assert await total_depth(amqp, settings) == 0


# --- CORS -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "asked"),
    [
        ("POST", "/tickets/purchase", "content-type,idempotency-key"),
        # HEAD is answered wherever GET is: a page may send one with a header needing a preflight.
        ("HEAD", "", "if-none-match"),
    ],
)
async def test_cors_preflight_is_allowed(
    api: httpx.AsyncClient, method: str, target: str, asked: str
) -> None:
    event = await create_event(api)

    response = await api.options(
        f"/events/{event['id']}{target}",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": asked,
        },
    )

    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] in ("*", ORIGIN)
    assert method.lower() in header_list(response, "access-control-allow-methods")
    assert set(asked.split(",")) <= header_list(response, "access-control-allow-headers")


async def test_cors_preflights_are_counted_on_their_own(api: httpx.AsyncClient) -> None:
    """Answered before any route, allowed or refused: counted under the route `preflight`."""

    def counted(status: int) -> float:
        labels = {"method": "OPTIONS", "route": cors.PREFLIGHT, "status": str(status)}
        return REGISTRY.get_sample_value("ticketing_http_requests_total", labels) or 0.0

    before = counted(200), counted(400)
    asked = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    allowed = await api.options("/events", headers=asked)
    refused = await api.options(
        "/events", headers={**asked, "Access-Control-Request-Headers": "x-evil"}
    )

    assert (allowed.status_code, refused.status_code) == (200, 400)
    assert (counted(200) - before[0], counted(400) - before[1]) == (1, 1)


async def test_cors_exposes_location_and_retry_after_on_a_purchase(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api)

    response = await api.post(
        f"/events/{event['id']}/tickets/purchase",
        json={"customer_id": "c", "quantity": 1},
        headers={"Origin": ORIGIN},
    )

    assert response.status_code == 202
    assert response.headers["access-control-allow-origin"] in ("*", ORIGIN)
    assert {"location", "retry-after"} <= header_list(response, "access-control-expose-headers")


async def test_cors_headers_are_on_error_responses_too(api: httpx.AsyncClient) -> None:
    too_large = await api.post(
        "/events",
        content=padded_event_json(MAX_BODY + 1),
        headers={"content-type": "application/json", "Origin": ORIGIN},
    )
    not_found = await api.get("/nowhere", headers={"Origin": ORIGIN})

    assert_problem(too_large, 413)
    assert_problem(not_found, 404)
    assert too_large.headers["access-control-allow-origin"] in ("*", ORIGIN)
    assert not_found.headers["access-control-allow-origin"] in ("*", ORIGIN)


def starlettes_preflight_headers(
    settings: Settings, request: dict[str, str]
) -> set[tuple[str, str]]:
    """The headers Starlette's own CORS logic puts on its answer to this preflight, but for
    those of its text/plain body."""
    cors = CORSMiddleware(create_app(settings), **cors_options(settings))
    answer = cors.preflight_response(request_headers=Headers(headers=request))
    assert answer.status_code == 400
    return {item for item in answer.headers.items() if not item[0].startswith("content-")}


@pytest.mark.parametrize(
    ("asked", "named"),
    [
        ({"Access-Control-Request-Method": "PUT"}, ["PUT"]),
        (
            {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-Evil"},
            ["x-evil"],
        ),
        (
            {"Access-Control-Request-Method": "TRACE", "Access-Control-Request-Headers": "X-A"},
            ["TRACE", "x-a"],
        ),
    ],
    ids=["method", "header", "both"],
)
async def test_a_refused_cors_preflight_is_a_problem_with_starlettes_cors_headers(
    api: httpx.AsyncClient, settings: Settings, asked: dict[str, str], named: list[str]
) -> None:
    request = {"Origin": ORIGIN, **asked}

    response = await api.options("/events", headers=request)

    problem = assert_problem(response, 400)
    assert problem["instance"] == "/events"
    assert all(what in problem["detail"] for what in named), problem["detail"]
    cors_headers = {item for item in response.headers.items() if not item[0].startswith("content-")}
    assert cors_headers == starlettes_preflight_headers(settings, request)


async def test_a_preflight_from_an_origin_not_allowed_is_a_problem_naming_it(
    settings: Settings,
) -> None:
    app = create_app(settings.model_copy(update={"cors_origins": [ORIGIN]}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.options(
                "/events",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
            )

    problem = assert_problem(response, 400)
    assert "https://evil.example" in problem["detail"]
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-methods" in response.headers


# --- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/nowhere", "/events/{event_id}/nope", "/purchases", "/events/{event_id}/tickets"]
)
async def test_unknown_route_is_404_problem(api: httpx.AsyncClient, path: str) -> None:
    event = await create_event(api)

    response = await api.get(path.format(event_id=event["id"]))

    assert_problem(response, 404)


@pytest.mark.parametrize(
    ("path", "status", "instance"),
    [
        ("//evil.example/events", 404, "/%2Fevil.example/events"),
        ("/no where", 404, "/no%20where"),
        ("/events/caf\u00e9", 422, "/events/caf%C3%A9"),
    ],
)
async def test_a_problems_instance_is_a_reference_to_this_server_whatever_the_path(
    api: httpx.AsyncClient, path: str, status: int, instance: str
) -> None:
    """RFC 9457's `instance` is a URI reference: a path starting `//` would name another host
    (a client resolves `//evil.example/events` there), and a space or an é is no URI."""
    response = await api.get(httpx.URL(f"http://t{path}"))

    assert assert_problem(response, status)["instance"] == instance


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/events/"),
        ("POST", "/events/"),
        ("GET", "/events/{event_id}/"),
        ("POST", "/events/{event_id}/tickets/purchase/"),
        ("GET", "/healthz/"),
    ],
)
async def test_a_trailing_slash_is_404_never_a_redirect_to_the_requests_host(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    """A redirect would build its Location from the Host header the client sent."""
    event = await create_event(api)

    response = await api.request(
        method,
        path.format(event_id=event["id"]),
        json={"customer_id": "c", "quantity": 1},
        headers={"Host": "evil.example"},
    )

    assert_problem(response, 404)
    assert "location" not in response.headers


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/events", {"GET", "HEAD", "POST"}),
        ("DELETE", "/events", {"GET", "HEAD", "POST"}),
        ("PUT", "/events/{event_id}", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("POST", "/events/{event_id}", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("GET", "/events/{event_id}/tickets/purchase", {"POST"}),
        ("POST", "/purchases/{event_id}", {"GET", "HEAD"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("POST", "/openapi.json", {"GET", "HEAD"}),
        ("OPTIONS", "/events", {"GET", "HEAD", "POST"}),  # not a CORS preflight: none answers it
    ],
)
async def test_wrong_method_is_405_problem_allowing_every_method_of_the_path(
    api: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    """RFC 9110 §15.5.6: the Allow of a 405 lists every method the resource supports, also
    where its methods are served by several routes (GET and POST /events are two)."""
    event = await create_event(api)

    response = await api.request(method, path.format(event_id=event["id"]), json={})

    assert_problem(response, 405)
    listed = [item.strip() for item in response.headers["allow"].split(",")]
    assert set(listed) == allowed
    assert len(listed) == len(allowed)


# --- HEAD -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/readyz",
        "/metrics",
        "/events",
        "/events/{event_id}",
        "/purchases/{purchase_id}",
        "/demo",
        "/openapi.json",
        "/nowhere",
    ],
)
async def test_head_is_answered_as_get_without_the_body(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings, path: str
) -> None:
    """RFC 9110 §9.1: every GET resource answers HEAD (load balancers probe with it), with the
    GET's status and headers and no body."""
    event = await create_event(api)
    purchase_id = PurchaseIds(settings.purchase_id_secret).new()
    await record_purchase(db, purchase_id=purchase_id, event_id=event["id"])  # decided: stable
    target = path.format(event_id=event["id"], purchase_id=purchase_id)

    got = await api.get(target)
    head = await api.head(target)

    assert head.status_code == got.status_code
    assert head.content == b""
    if path == "/metrics":  # counts the GET just made: its length moves
        assert head.headers.keys() == got.headers.keys()
        assert head.headers["content-type"] == got.headers["content-type"]
    else:
        assert sorted(head.headers.multi_items()) == sorted(got.headers.multi_items())


async def test_head_of_a_status_stream_answers_its_headers_and_holds_nothing(
    api: httpx.AsyncClient,
) -> None:
    """The GET of a pending purchase's stream lasts minutes; its HEAD is the stream's head,
    ended at once (this client runs the app to its end before answering)."""
    event = await create_event(api)
    purchase_id = (await purchase(api, event["id"])).json()["purchase_id"]

    async with asyncio.timeout(10):
        head = await api.head(f"/purchases/{purchase_id}/events")

    assert head.status_code == 200
    assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert head.headers["cache-control"] == "no-store"
    assert head.content == b""


async def test_head_over_http_ends_at_the_head_and_lets_go_of_the_stream(
    settings: Settings,
) -> None:
    app = create_app(settings)
    async with served_api(settings, app) as client:
        waiters = app.state.resources.waiters
        event = await create_event(client)
        purchase_id = (await purchase(client, event["id"])).json()["purchase_id"]
        got = await client.get("/healthz")

        async with asyncio.timeout(10):
            probe = await client.head("/healthz")
            stream = await client.head(f"/purchases/{purchase_id}/events")
            after = await client.get("/healthz")  # the connection is free again
        await wait_for(_no_waiter(waiters), timeout_s=5, what="the stream let go of its waiter")

    assert (probe.status_code, probe.content) == (200, b"")
    assert probe.headers["content-length"] == got.headers["content-length"]
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert after.status_code == 200


async def test_head_where_there_is_no_get_is_405_allowing_what_is_there(
    api: httpx.AsyncClient,
) -> None:
    event = await create_event(api)

    response = await api.head(f"/events/{event['id']}/tickets/purchase")

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.content == b""


def _no_waiter(waiters: StatusWaiters[Purchase]) -> Callable[[], Awaitable[bool]]:
    async def none_held() -> bool:
        return waiters.held == 0

    return none_held


def test_head_is_no_operation_of_the_openapi_document() -> None:
    document = json.loads(render())

    assert not [path for path, operations in document["paths"].items() if "head" in operations]


# --- OpenAPI --------------------------------------------------------------------------------


async def test_openapi_json_and_docs_are_served(api: httpx.AsyncClient) -> None:
    document = await api.get("/openapi.json")
    docs = await api.get("/docs")

    assert document.status_code == 200
    assert {"/events", "/events/{event_id}", "/purchases/{purchase_id}"} <= set(
        document.json()["paths"]
    )
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]


# The headers a client acts on; the document must name each an answer carries.
ACTIONABLE = {"location", "etag", "retry-after", "cache-control"}


async def test_the_document_names_the_headers_each_answer_carries(
    api: httpx.AsyncClient,
) -> None:
    """A generated client reads Location, ETag and Retry-After from the document: each answer's
    actionable headers are exactly those documented for its operation and status."""
    document = json.loads(render())["paths"]
    created = await api.post("/events", json=event_body(hold_seconds=300))
    event_id = created.json()["id"]
    bought = await api.post(
        f"/events/{event_id}/tickets/purchase", json={"customer_id": "c", "quantity": 1}
    )
    purchase_id = bought.json()["purchase_id"]
    answers = [
        ("post", "/events", created),
        ("get", "/events/{event_id}", await api.get(f"/events/{event_id}")),
        ("patch", "/events/{event_id}", await api.patch(f"/events/{event_id}", json={"name": "n"})),
        ("post", "/events/{event_id}/tickets/purchase", bought),
        ("get", "/purchases/{purchase_id}", await api.get(f"/purchases/{purchase_id}")),
        (
            "post",
            "/purchases/{purchase_id}/confirm",
            await api.post(f"/purchases/{purchase_id}/confirm", json={"payment_reference": "p"}),
        ),
        (
            "post",
            "/purchases/{purchase_id}/cancel",
            await api.post(f"/purchases/{purchase_id}/cancel"),
        ),
    ]

    for method, path, answer in answers:
        assert answer.status_code < 300, (method, path, answer.text)
        documented = document[path][method]["responses"][str(answer.status_code)]
        named = {name.lower() for name in documented.get("headers", {})}
        assert named == ACTIONABLE & set(answer.headers.keys()), (method, path)
    for path, operations in document.items():
        for method, operation in operations.items():
            if "503" in operation["responses"]:
                assert "Retry-After" in operation["responses"]["503"]["headers"], (method, path)


def test_every_problem_is_documented_as_problem_json_with_its_schema_and_only_so() -> None:
    """A problem is only ever sent as application/problem+json: a client built from the
    document must find the Problem schema there, and no application/json it will never get."""
    misdocumented = [
        f"{method.upper()} {path} {status}: {sorted(response.get('content', {}))}"
        for path, operations in json.loads(render())["paths"].items()
        for method, operation in operations.items()
        for status, response in operation["responses"].items()
        if int(status) >= 400
        and response.get("content")
        != {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    ]

    assert misdocumented == []


async def test_served_openapi_matches_the_rendered_document(api: httpx.AsyncClient) -> None:
    response = await api.get("/openapi.json")

    assert response.json() == json.loads(render())


def test_checked_in_openapi_json_is_up_to_date() -> None:
    checked_in = OPENAPI_FILE.read_text(encoding="utf-8")

    if checked_in != render():
        pytest.fail(
            f"{OPENAPI_FILE} is stale: it no longer matches the API. Run `make openapi` and "
            "commit the result."
        )


async def test_a_client_that_leaves_mid_body_is_no_error_of_ours(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A client closing its connection before its body arrived whole is counted, and logged as
    what it is, never as an unhandled error with a traceback: on a route that reads its body
    itself (confirm), and on the purchase the dispatch hands to its route."""
    async with served_api(settings) as api:
        event = await create_event(api, hold_seconds=60)
        port = api.base_url.port
        assert port is not None
        paths = [
            f"/purchases/{(await purchase(api, event['id'])).json()['purchase_id']}/confirm",
            f"/events/{event['id']}/tickets/purchase",
        ]
        before = (await api.get("/metrics")).text
        with caplog.at_level(logging.INFO):
            for path in paths:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    "content-length: 100\r\n\r\n{".encode()
                )
                await writer.drain()
                writer.close()
            await asyncio.sleep(0.5)
        after = (await api.get("/metrics")).text

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert sum("closed before the request body" in r.getMessage() for r in caplog.records) == 2
    for route in ("/purchases/{purchase_id}/confirm", "/events/{event_id}/tickets/purchase"):
        labels = {"method": "POST", "route": route, "status": "400"}
        name = "ticketing_http_requests_total"
        assert sample(after, name, **labels) - sample(before, name, **labels) == 1, route
