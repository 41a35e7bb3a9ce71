"""Connections to RabbitMQ: one node of RABBITMQ_URL at a time, the next one when it is lost.

RABBITMQ_URL lists one URL per node of a cluster. A process connects to the first node that
answers; when it loses that connection it tries the nodes after it first (the one it lost is
likely the one that is down) and comes back around the list, so a lost node costs about a
reconnect interval. Connections are plain, never aio-pika's robust ones: those reconnect to the
one URL they were given, and would silently restore a worker's consumers on partitions it may no
longer lease. Their owners reconnect: the API through `BrokerLink`, the worker in its own loop.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory

from shared import amqp_receive
from shared.retry import BROKER_UNAVAILABLE, wait_for_service
from shared.settings import Settings
from shared.urls import where

log = logging.getLogger(__name__)

# The broker closes a connection after two missed heartbeats: short, so that a frozen worker's
# single-active-consumer slot passes to the lease's new owner within seconds, not minutes.
HEARTBEAT_S = 5
# A node that neither answers nor refuses (a host gone from the network) is given up after this.
CONNECT_TIMEOUT_S = 2.0
# A node that kept a publish unconfirmed past its timeout is left if it does not answer within
# this either (a hung node: it answers nothing, yet its connection looks open for 18 s).
SUSPECT_TIMEOUT_S = 1.0
# ... and only if it has sent nothing for this long: a live node sends a frame (a heartbeat at
# least) every half HEARTBEAT_S, even to a connection it blocks.
SILENT_S = float(HEARTBEAT_S)
# After losing its node, a process tries the others this often (503s meanwhile).
RECONNECT_INTERVAL_S = 0.25
# How long a connection that was lost or left is given to close politely (see _close_lost).
LOST_CLOSE_S = 1.0

# What a connect raises when the node is not there: refused, reset, timed out, closed mid-handshake.
UNREACHABLE: tuple[type[BaseException], ...] = (*BROKER_UNAVAILABLE, TimeoutError)


class _KeepsWriter(TransportFactory):
    """aiormq's own transport (TCP, or TLS for amqps), its socket writer kept for the publisher
    (shared/amqp_publish.py writes a message straight to it when nothing is queued ahead)."""

    def __init__(self, scheme: str) -> None:
        self._made: TransportFactory = (
            TLSTransportFactory() if scheme == "amqps" else TCPTransportFactory()
        )
        self.writer: asyncio.StreamWriter | None = None

    async def create(
        self, url: Any, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, self.writer = await self._made.create(url, **kwargs)
        return reader, self.writer


class _Connection(aio_pika.Connection):
    """A connection that is closed when connecting fails: aio-pika leaves that one to the
    garbage collector, which schedules a close nobody awaits (a warning per refused node). Its
    socket writer is kept (see socket_of)."""

    _made_by: _KeepsWriter | None = None

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the base signature)
        # A factory per connection: aio-pika hands its keyword arguments on to aiormq.
        self._made_by = self.kwargs["transport_factory"] = _KeepsWriter(self.url.scheme)
        try:
            await super().connect(timeout)
        except BaseException:
            await self.close()
            raise


def socket_of(connection: AbstractConnection) -> asyncio.StreamWriter | None:
    """The socket writer of a connection made here (None for any other)."""
    if isinstance(connection, _Connection) and connection._made_by is not None:
        return connection._made_by.writer
    return None


async def connect_any(
    settings: Settings, role: str, *, first: int = 0
) -> tuple[AbstractConnection, int]:
    """A connection to the first node that answers, trying them in turn from index `first`;
    and that node's index. Raises the last node's error when none answers."""
    urls = settings.rabbitmq_urls
    amqp_receive.install()
    error: BaseException | None = None
    for step in range(len(urls)):
        index = (first + step) % len(urls)
        try:
            connection = await aio_pika.connect(
                urls[index],
                heartbeat=HEARTBEAT_S,
                timeout=CONNECT_TIMEOUT_S,
                client_properties={"connection_name": f"ticketing {role}"},
                connection_class=_Connection,
            )
        except UNREACHABLE as exc:
            if len(urls) > 1:
                log.warning("rabbitmq node %s unavailable: %r", where(urls[index]), exc)
            error = exc
            continue
        return connection, index
    assert error is not None  # the list is never empty (Settings checks it)
    raise error


async def connect(
    settings: Settings, role: str = "client", *, wait_s: float = 0.0
) -> AbstractConnection:
    """A connection to the first node that answers, waiting up to `wait_s` for one to."""
    async for attempt in wait_for_service("rabbitmq", UNREACHABLE, wait_s):
        with attempt:
            connection, _ = await connect_any(settings, role)
    return connection


class BrokerLink:
    """Keeps one connection to some node of RABBITMQ_URL for a process's lifetime.

    `on_connected` runs on every new connection (opening channels, declaring the topology);
    while there is none, `connected` is False and the process answers 503s. A lost connection
    is replaced by one to the next node that answers, tried every RECONNECT_INTERVAL_S.
    """

    def __init__(
        self,
        settings: Settings,
        role: str,
        on_connected: Callable[[AbstractConnection], Awaitable[None]],
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._role = role
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._connection: AbstractConnection | None = None
        self._index = 0
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False
        self.connects = 0  # connections made, the first included (a reconnect is logged; tests)
        # The check under way, if any, and the connection it asks.
        self._answering: tuple[AbstractConnection, asyncio.Task[bool]] | None = None
        self._suspecting: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._connection is not None

    async def answers(self, timeout_s: float) -> bool:
        """Whether the node connected to answers within `timeout_s` (a channel opened and
        closed). A hung node (a paused VM, a frozen process) answers nothing, yet its connection
        looks open until three heartbeat intervals pass without a frame: 18 s. Concurrent calls
        share one check."""
        connection = self._connection
        if connection is None:
            return False
        if self._answering is None or self._answering[0] is not connection:
            task = asyncio.get_running_loop().create_task(
                _answers(connection, timeout_s), name="rabbitmq-answers"
            )
            task.add_done_callback(self._answered)
            self._answering = (connection, task)
        return await asyncio.shield(self._answering[1])

    def _answered(self, answering: "asyncio.Task[bool]") -> None:
        if self._answering is not None and self._answering[1] is answering:
            self._answering = None

    def suspect(self) -> None:
        """The node kept a publish unconfirmed for its whole timeout: leave it for the next one
        if it has sent nothing for SILENT_S (not even a heartbeat) and does not answer within
        SUSPECT_TIMEOUT_S either, rather than wait for three heartbeat intervals (18 s). A node
        that still talks is kept: it may be slow, blocked by a memory alarm (as every node then),
        electing leaders or without a quorum, where no other node would do better; and a busy
        API that reads its frames late is no reason to drop a healthy connection."""
        connection = self._connection
        if connection is None or self._suspecting is not None:
            return
        silent = _silent_for(connection)
        if silent is not None and silent < SILENT_S:
            return
        self._suspecting = asyncio.get_running_loop().create_task(
            self._leave_if_silent(connection), name="rabbitmq-suspect"
        )

    async def _leave_if_silent(self, connection: AbstractConnection) -> None:
        try:
            if not await _answers(connection, SUSPECT_TIMEOUT_S):
                self._lost(connection, "answers nothing")
        finally:
            self._suspecting = None

    @property
    def node(self) -> str | None:
        """host:port of the node connected to, if any."""
        return where(self._settings.rabbitmq_urls[self._index]) if self.connected else None

    async def start(self, *, wait_s: float) -> None:
        """Connect to the first node that answers, waiting up to `wait_s` for one."""
        async for attempt in wait_for_service("rabbitmq", UNREACHABLE, wait_s):
            with attempt:
                await self._attach(first=0)

    async def close(self) -> None:
        self._closing = True
        if self._answering is not None:
            self._answering[1].cancel()
        if self._suspecting is not None:
            self._suspecting.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _attach(self, *, first: int) -> None:
        connection, index = await connect_any(self._settings, self._role, first=first)
        try:
            await self._on_connected(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection, self._index = connection, index
        self.connects += 1
        # A plain connection's is_closed stays False when the broker vanishes abruptly; its
        # close callbacks always fire.
        connection.close_callbacks.add(lambda *_: self._lost(connection))
        if self.connects > 1:
            log.warning("rabbitmq: connected to node %s", self.node)

    def _lost(self, connection: AbstractConnection, why: str = "lost") -> None:
        if self._closing or self._connection is not connection:
            return
        log.warning("rabbitmq connection to %s %s; trying the other nodes", self.node, why)
        self._connection = None
        if self._on_lost is not None:
            self._on_lost()
        self._reconnecting = asyncio.get_running_loop().create_task(
            self._reconnect(connection), name="rabbitmq-reconnect"
        )

    async def _reconnect(self, lost: AbstractConnection) -> None:
        await _close_lost(lost)
        # The node just lost goes last: it is the likeliest to be down.
        first = self._index + 1
        while not self._closing:
            try:
                await self._attach(first=first)
                return
            except Exception as exc:
                log.warning("rabbitmq: no node could be reached (%r); retrying", exc)
            await asyncio.sleep(RECONNECT_INTERVAL_S)


async def _close_lost(connection: AbstractConnection) -> None:
    """Close a connection that was lost or left. One lost abruptly still counts as open to
    aio-pika, and the garbage collector would schedule a close that nobody awaits. A hung node
    never answers the close: after LOST_CLOSE_S its socket is dropped, and a second close (with
    no transport left to wait on) marks the connection closed.

    The drop is timed on its own, not after the timed-out close: a node that stopped reading
    leaves our writes in the socket's buffer, and aiormq's close then waits for that socket to
    close however often it is cancelled (it waits again in a `finally`)."""
    socket = socket_of(connection)
    drop = (
        asyncio.get_running_loop().call_later(LOST_CLOSE_S, socket.transport.abort)
        if socket is not None
        else None
    )
    try:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LOST_CLOSE_S):
                await connection.close()
    finally:
        if drop is not None:
            drop.cancel()
    if not connection.is_closed:
        with contextlib.suppress(Exception):
            await connection.close()


def _silent_for(connection: AbstractConnection) -> float | None:
    """Seconds since the node last sent anything on `connection`, heartbeats included, as aiormq
    records it for its own stuck-connection check (it offers no public reading); None if that
    cannot be read (another aiormq), and then only asking the node tells."""
    underlay = getattr(getattr(connection, "transport", None), "connection", None)
    last = getattr(underlay, "_Connection__last_frame_time", None)
    if not isinstance(last, float):
        return None
    return asyncio.get_running_loop().time() - last


async def _answers(connection: AbstractConnection, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            channel = await connection.channel(publisher_confirms=False)
            await channel.close()
    except Exception:  # timed out, or the connection went meanwhile
        return False
    return True
