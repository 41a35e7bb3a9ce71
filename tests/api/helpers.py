"""Helpers for the HTTP API tests: problem+json checks, reading the partition queues back, and an
isolated API (own database and broker namespace) that a whole module can share."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aio_pika.abc
import asyncpg
import httpx
import uvicorn
from fastapi import FastAPI

from api.main import create_app
from api.problems import Problem
from shared.broker import Topology
from shared.messages import PurchaseMessage, PurchaseRequested
from shared.migrate import drop_database
from shared.settings import Settings
from tests.conftest import (
    RUN_ID,
    Services,
    api_client,
    delete_topology,
    make_settings,
)
from tests.databases import clone
from tests.metrics import free_port

PROBLEM_JSON = "application/problem+json"
PROBLEM_FIELDS = ("type", "title", "status", "detail", "instance")


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status, and leaks no stack trace."""
    assert response.status_code == status, (
        f"expected {status}, got {response.status_code}: {response.text[:500]}"
    )
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    assert media_type == PROBLEM_JSON, f"content-type {media_type!r}: {response.text[:200]}"
    body: dict[str, Any] = response.json()
    for name in PROBLEM_FIELDS:
        assert name in body, f"problem without {name!r}: {body}"
    assert isinstance(body["type"], str)
    assert body["type"]
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert isinstance(body["instance"], str)
    assert body["instance"].startswith("/")
    assert body["status"] == status
    # The documented model, field for field (nothing else, nothing null).
    assert Problem.model_validate_json(response.content).model_dump(exclude_none=True) == body
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    return body


def partition_queue(settings: Settings, event_id: str | UUID) -> tuple[int, str]:
    """(partition, queue name) that the purchases of this event are published to."""
    topology = Topology.from_settings(settings)
    partition = topology.partition_of(UUID(str(event_id)))
    return partition, topology.queue(partition)


async def queue_stats(channel: aio_pika.abc.AbstractChannel, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, by passive declare (never creates it)."""
    queue = await channel.declare_queue(name, passive=True)
    result = queue.declaration_result
    return result.message_count or 0, result.consumer_count or 0


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    return (await queue_stats(channel, name))[0]


async def total_depth(channel: aio_pika.abc.AbstractChannel, settings: Settings) -> int:
    topology = Topology.from_settings(settings)
    return sum([await queue_depth(channel, topology.queue(p)) for p in range(topology.partitions)])


async def read_messages(
    channel: aio_pika.abc.AbstractChannel, name: str, count: int, *, timeout_s: float = 5.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Receive `count` messages from a partition queue, in queue order, leaving them unacked.

    The partition queues are quorum queues with single active consumer, on which RabbitMQ
    refuses basic.get (RESOURCE_LOCKED); so this subscribes, takes what it needs and cancels.
    Unacked messages go back to the queue when the test's channel closes.
    """
    queue = await channel.get_queue(name)
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def deliver(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        inbox.put_nowait(message)

    tag = await queue.consume(deliver)
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(messages) < count:
                messages.append(await inbox.get())
    except TimeoutError:
        raise AssertionError(
            f"only {len(messages)} of {count} messages arrived from {name}"
        ) from None
    finally:
        await queue.cancel(tag)
    return messages


def purchases_in(
    messages: list[aio_pika.abc.AbstractIncomingMessage],
) -> list[PurchaseRequested]:
    """Every purchase the messages carry, in queue order."""
    return [
        purchase
        for message in messages
        for purchase in PurchaseMessage.from_body(message.body).purchases
    ]


async def wait_for_no_consumers(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, *, timeout_s: float = 15.0
) -> None:
    """Wait until no partition queue has a consumer (a stopped worker has let go)."""
    topology = Topology.from_settings(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        consumers = [
            (await queue_stats(channel, topology.queue(p)))[1] for p in range(topology.partitions)
        ]
        if not any(consumers):
            return
        assert time.monotonic() < deadline, f"consumers still attached: {consumers}"
        await asyncio.sleep(0.05)


async def record_purchase(
    pool: asyncpg.Pool, *, purchase_id: UUID, event_id: str | UUID, quantity: int = 1
) -> None:
    """Record a confirmed purchase the way the worker does (one row in purchases)."""
    await pool.execute(
        """
        INSERT INTO purchases (id, event_id, customer_id, quantity, status, accepted_at)
        VALUES ($1, $2, 'customer-sql', $3, 'confirmed', now())
        """,
        purchase_id,
        UUID(str(event_id)),
        quantity,
    )


@dataclass(frozen=True)
class IsolatedApi:
    settings: Settings
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def isolated_api(
    services: Services, template_database: str, tag: str
) -> AsyncIterator[IsolatedApi]:
    """An API on its own database (cloned from the migrated template) and broker namespace, for
    a module whose tests only add rows and never read the whole table or a whole queue."""
    database = f"ticketing_test_{RUN_ID}_{tag}"
    await clone(services.database_url, template_database, database)
    settings = make_settings(services, database, f"test.{RUN_ID}.{tag}")
    try:
        async with api_client(settings) as client:
            yield IsolatedApi(settings, client)
    finally:
        await delete_topology(settings)
        drop_database(settings.database_url)


@contextlib.asynccontextmanager
async def served_api(
    settings: Settings, app: FastAPI | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The API (`app`, else a new one) served by uvicorn in this process, on a free port, and a
    client over TCP: for what httpx's ASGI transport cannot show, such as a response streamed as
    it is written, or a client that leaves."""
    app = app or create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not serving.done(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
