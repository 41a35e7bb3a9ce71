"""RABBITMQ_URL as a list of nodes: the first that answers is used, and a lost node is replaced by
the next within about a second, with 503s (never anything else) in between.

Two TCP proxies in front of the one local broker stand for two nodes: cutting one is, for the
client, a node gone. The real 3-node cluster is in tests/faults/test_broker_cluster.py."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID, uuid4

import aio_pika
import pytest
from pydantic import ValidationError

from shared import broker
from shared.broker_nodes import LOST_CLOSE_S, BrokerLink, _close_lost, connect_any, socket_of
from shared.errors import BrokerUnavailable
from shared.messages import AcceptedPurchase
from shared.publisher import PurchasePublisher
from shared.settings import Settings
from tests.faults.proxy import TcpProxy, proxy_for, through


def test_rabbitmq_url_takes_one_url_or_a_comma_separated_list() -> None:
    one = Settings(rabbitmq_url="amqp://u:p@a:5672/")
    assert one.rabbitmq_urls == ["amqp://u:p@a:5672/"]
    three = Settings(rabbitmq_url=" amqp://u:p@a:5701/, amqp://u:p@b:5702/ ,amqps://c/ ")
    assert three.rabbitmq_urls == ["amqp://u:p@a:5701/", "amqp://u:p@b:5702/", "amqps://c/"]
    # The management API of each node, with its credentials, unless set.
    assert three.rabbitmq_management_urls == [
        "http://u:p@a:15672/",
        "http://u:p@b:15672/",
        "https://c:15672/",
    ]
    own = Settings(rabbitmq_url="amqp://a/", rabbitmq_management_url="http://m1:1/,http://m2:2/")
    assert own.rabbitmq_management_urls == ["http://m1:1/", "http://m2:2/"]


@pytest.mark.parametrize("value", ["", " , ", "http://a:5672/", "amqp://a/,redis://b/"])
def test_rabbitmq_url_refuses_anything_but_amqp_urls(value: str) -> None:
    with pytest.raises(ValidationError, match="rabbitmq_url"):
        Settings(rabbitmq_url=value)


@pytest.mark.parametrize(
    "value", ["not a url", "amqp://a:5672/", "http://", "http://a:b:c/", "http://m:1/,rmq-2"]
)
def test_rabbitmq_management_url_refuses_anything_but_http_urls_with_a_host(value: str) -> None:
    """Refused at start with one line naming it, rather than a status reading "no management
    API answered at :" (an empty address) with everything else right."""
    with pytest.raises(ValidationError, match="rabbitmq_management_url"):
        Settings(rabbitmq_management_url=value)


def test_quorum_replicas_defaults_to_three_and_must_be_positive() -> None:
    assert Settings().quorum_replicas == 3
    with pytest.raises(ValidationError, match="quorum_replicas"):
        Settings(quorum_replicas=0)


async def test_the_first_node_that_answers_is_used(settings: Settings) -> None:
    async with (
        proxy_for(settings.rabbitmq_url, 5672) as down,
        proxy_for(settings.rabbitmq_url, 5672) as up,
    ):
        down.cut()
        nodes = _nodes(settings, down, up)
        connection, index = await connect_any(nodes, "test")
        await connection.close()
        assert index == 1
        # From a given node on, in turn: the node after the last one wraps to the first.
        connection, index = await connect_any(nodes, "test", first=2)
        await connection.close()
        assert index == 1


async def test_no_node_answering_raises_the_connect_error(settings: Settings) -> None:
    async with (
        proxy_for(settings.rabbitmq_url, 5672) as a,
        proxy_for(settings.rabbitmq_url, 5672) as b,
    ):
        a.cut()
        b.cut()
        with pytest.raises(ConnectionError):
            await connect_any(_nodes(settings, a, b), "test")


async def test_a_lost_node_is_replaced_within_a_second_with_only_503s_meanwhile(
    settings: Settings,
) -> None:
    async with (
        proxy_for(settings.rabbitmq_url, 5672) as first,
        proxy_for(settings.rabbitmq_url, 5672) as second,
    ):
        nodes = _nodes(settings, first, second)
        publisher = PurchasePublisher(broker.Topology.from_settings(settings), timeout_s=5)
        link = BrokerLink(nodes, "test", on_connected=publisher.start)
        await link.start(wait_s=0)
        try:
            assert link.node == f"127.0.0.1:{first.port}"
            event_id = uuid4()
            await publisher.publish(_purchase(event_id))

            refused = published = 0
            first.cut()
            cut_at = time.monotonic()
            while not (link.connected and link.node == f"127.0.0.1:{second.port}"):
                assert time.monotonic() - cut_at < 5, "no failover within 5 s"
                try:
                    await publisher.publish(_purchase(event_id))
                    published += 1
                except BrokerUnavailable:  # a 503 with Retry-After at the API
                    refused += 1
                await asyncio.sleep(0.01)
            failover_s = time.monotonic() - cut_at
            await publisher.publish(_purchase(event_id))  # through the second node
        finally:
            await publisher.close()
            await link.close()
    print(f"\nfailover to the second node in {failover_s:.2f} s; {refused} publish(es) refused")
    assert failover_s < 1.5, failover_s
    assert refused >= 1  # the cut was seen, as a 503
    assert link.connects == 2


async def test_a_node_that_goes_silent_is_left_once_a_publish_times_out(
    settings: Settings,
) -> None:
    """A hung node (a frozen proxy: connections open, not a byte through) is left for the next
    once a publish on it times out, well before aiormq's three heartbeat intervals (18 s)."""
    async with _publishing_through_two_nodes(settings) as (first, second, link, publisher):
        event_id = uuid4()
        silent = link._connection
        assert silent is not None
        first.freeze()
        frozen_at = time.monotonic()
        while not (link.connected and link.node == f"127.0.0.1:{second.port}"):
            assert time.monotonic() - frozen_at < 12, "still on the silent node"
            with contextlib.suppress(BrokerUnavailable):
                await publisher.publish(_purchase(event_id))
            await asyncio.sleep(0.05)
        left_after_s = time.monotonic() - frozen_at
        await publisher.publish(_purchase(event_id))  # through the second node
        # The connection left behind is closed though the node never answered the close (else
        # the garbage collector schedules a close nobody awaits).
        assert silent.is_closed
    print(f"\nleft the silent node after {left_after_s:.1f} s")
    assert link.connects == 2


async def test_a_connection_left_on_a_node_that_stopped_reading_is_closed_within_its_bound(
    settings: Settings,
) -> None:
    """A hung node that stopped reading leaves our writes in the socket's buffer, and aiormq's
    close then waits for that socket for ever: the socket is dropped after LOST_CLOSE_S."""
    async with proxy_for(settings.rabbitmq_url, 5672) as node:
        connection, _ = await connect_any(_nodes(settings, node), "test")
        socket = socket_of(connection)
        assert socket is not None
        channel = await connection.channel(publisher_confirms=False)
        node.freeze()
        body = aio_pika.Message(b"x" * 1024 * 1024)

        async def flood() -> None:
            for _ in range(20):
                await channel.default_exchange.publish(body, routing_key="nowhere")

        flooding = asyncio.create_task(flood())
        try:
            # Until the kernel's buffers are full too: what is left waits in the transport's.
            async with asyncio.timeout(10):
                while True:
                    if socket.transport.get_write_buffer_size() >= 256 * 1024:
                        break
                    await asyncio.sleep(0.05)
            started = time.monotonic()
            async with asyncio.timeout(LOST_CLOSE_S + 5):
                await _close_lost(connection)
            took_s = time.monotonic() - started
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
            node.thaw()
    assert took_s < LOST_CLOSE_S + 0.5, took_s
    assert connection.is_closed
    assert socket.transport.is_closing()


async def test_a_node_that_is_slow_but_talks_is_kept(settings: Settings) -> None:
    """Publishes that time out on a node whose frames still arrive (late: a slow or blocked
    node, or an API reading late) are no reason to drop a healthy connection."""
    async with _publishing_through_two_nodes(settings) as (first, _, link, publisher):
        event_id = uuid4()
        first.reply_delay_s = 1.2  # every answer later than the publish timeout
        timed_out = 0
        slowed_at = time.monotonic()
        while time.monotonic() - slowed_at < 8:
            try:
                await publisher.publish(_purchase(event_id))
            except BrokerUnavailable:
                timed_out += 1
        assert link.connected
        assert link.node == f"127.0.0.1:{first.port}"
    assert timed_out >= 3  # the suspicion was raised, and dismissed
    assert link.connects == 1


@contextlib.asynccontextmanager
async def _publishing_through_two_nodes(
    settings: Settings,
) -> AsyncIterator[tuple[TcpProxy, TcpProxy, BrokerLink, PurchasePublisher]]:
    """Two proxies standing for two nodes, and a publisher on a link wired as the API wires
    them (api/resources.py), connected to the first with one purchase confirmed through it;
    publishes time out after 1 s."""
    async with (
        proxy_for(settings.rabbitmq_url, 5672) as first,
        proxy_for(settings.rabbitmq_url, 5672) as second,
    ):
        nodes = _nodes(settings, first, second)
        publisher = PurchasePublisher(broker.Topology.from_settings(nodes), timeout_s=1.0)
        link = BrokerLink(nodes, "test", on_connected=publisher.start, on_lost=publisher.detach)
        publisher.on_unconfirmed = link.suspect
        try:
            await link.start(wait_s=0)
            await publisher.publish(_purchase(uuid4()))
            yield first, second, link, publisher
        finally:
            first.thaw()
            await publisher.close()
            await link.close()


async def test_a_link_waits_at_start_for_a_node_to_come_up(settings: Settings) -> None:
    async with proxy_for(settings.rabbitmq_url, 5672) as only:
        only.cut()
        publisher = PurchasePublisher(broker.Topology.from_settings(settings), timeout_s=5)
        link = BrokerLink(_nodes(settings, only), "test", on_connected=publisher.start)
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, only.restore)
        try:
            await link.start(wait_s=10)
            assert link.connected
            assert publisher.is_ready
        finally:
            await publisher.close()
            await link.close()


def _nodes(settings: Settings, *proxies: TcpProxy) -> Settings:
    urls = ",".join(through(settings.rabbitmq_url, proxy.port) for proxy in proxies)
    return settings.model_copy(update={"rabbitmq_url": urls})


def _purchase(event_id: UUID) -> AcceptedPurchase:
    return AcceptedPurchase(
        purchase_id=uuid4(),
        event_id=event_id,
        customer_id="customer",
        quantity=1,
        accepted_at=datetime.now(UTC),
    )
