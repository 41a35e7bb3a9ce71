"""The publisher never leaves a caller waiting (a bug in a send fails its callers with a 503),
and keeps a partition's order with several messages in flight."""

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from uuid import uuid4

import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from shared import broker, broker_nodes
from shared import publisher as publisher_module
from shared.amqp_publish import ConfirmedPublisher
from shared.errors import BrokerUnavailable
from shared.in_flight import CpuIdle, InFlightWindow
from shared.messages import AcceptedPurchase, PurchaseMessage
from shared.publisher import PurchasePublisher
from shared.settings import Settings
from tests.factories import accepted_purchase
from tests.faults.proxy import proxy_for, through
from tests.worker.helpers import read_back


async def test_a_bug_while_sending_fails_the_callers_instead_of_hanging_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in building the message")

    connection = await broker_nodes.connect(settings)
    publisher = PurchasePublisher(broker.Topology.from_settings(settings), timeout_s=5)
    try:
        await publisher.start(connection)
        monkeypatch.setattr("shared.publisher.encode_message", broken)
        event_id = uuid4()
        purchases = [
            AcceptedPurchase(
                purchase_id=uuid4(),
                event_id=event_id,
                customer_id=f"customer-{i}",
                quantity=1,
                accepted_at=datetime.now(UTC),
            )
            for i in range(5)
        ]

        with caplog.at_level(logging.ERROR, logger="shared.publisher"):
            async with asyncio.timeout(2):  # far below the publish timeout: no waiting it out
                results = await asyncio.gather(
                    *(publisher.publish(p) for p in purchases), return_exceptions=True
                )
    finally:
        await publisher.close()
        await connection.close()

    assert all(isinstance(result, BrokerUnavailable) for result in results), results
    assert "failed unexpectedly" in caplog.text


class AlwaysIdle(CpuIdle):
    def __init__(self) -> None:
        pass

    def share(self) -> float:
        return 1.0


async def test_with_slow_confirms_a_wider_window_keeps_every_purchase_and_the_queue_order(
    settings: Settings,
) -> None:
    """Confirms 50 ms late and a CPU to spare: the window widens, several messages of one
    partition are in flight at once, and still every caller is answered only once its message
    is confirmed and the queue holds the purchases in the order they were accepted."""
    async with proxy_for(settings.rabbitmq_url, 5672, reply_delay_s=0.05) as proxy:
        slow = settings.model_copy(
            update={"rabbitmq_url": through(settings.rabbitmq_url, proxy.port)}
        )
        connection = await broker_nodes.connect(slow)
        window = InFlightWindow(maximum=4, cpu=AlwaysIdle(), interval_s=0.0)
        publisher = PurchasePublisher(
            broker.Topology.from_settings(settings), timeout_s=5, max_batch=2, window=window
        )
        try:
            await publisher.start(connection)
            event_id = uuid4()
            purchases = [accepted_purchase(event_id, i) for i in range(40)]
            widest = 0

            async def one(purchase: AcceptedPurchase) -> None:
                nonlocal widest
                await publisher.publish(purchase)
                widest = max(widest, window.size)

            await asyncio.gather(*(one(p) for p in purchases))
        finally:
            await publisher.close()
            await connection.close()
    assert widest > 1, "the window never widened"
    partition = broker.Topology.from_settings(settings).partition_of(event_id)
    bodies = await read_back(settings, broker.Topology.from_settings(settings).queue(partition))
    queued = [p.purchase_id for body in bodies for p in PurchaseMessage.from_body(body).purchases]
    assert queued == [p.purchase_id for p in purchases]


async def test_a_channel_the_broker_closed_is_reopened_at_most_once_a_second_never_waited_for(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the exchange gone, each channel the broker closes (404) is replaced on a later
    publish, at most once a second, while every publish is refused at once; once the exchange
    is back, publishes go through again on the last channel opened."""
    connection = await broker_nodes.connect(settings)
    topology = broker.Topology.from_settings(settings)
    publisher = PurchasePublisher(topology, timeout_s=5)
    opened = 0
    open_channel = publisher._open_channel

    async def counted(
        connection: AbstractConnection,
    ) -> tuple[AbstractChannel, ConfirmedPublisher]:
        nonlocal opened
        opened += 1
        return await open_channel(connection)

    monkeypatch.setattr(publisher, "_open_channel", counted)
    event_id = uuid4()
    loop = asyncio.get_running_loop()
    try:
        await publisher.start(connection)
        admin = await connection.channel()
        await admin.exchange_delete(topology.exchange)
        slowest = 0.0
        started = loop.time()
        while loop.time() - started < 2.5:
            publishing = loop.time()
            with pytest.raises(BrokerUnavailable):
                await publisher.publish(accepted_purchase(event_id, 0))
            slowest = max(slowest, loop.time() - publishing)
            await asyncio.sleep(0.05)
        renewed = opened - 1  # the first by start
        await broker.declare_topology(connection, topology)
        await asyncio.sleep(publisher_module.RENEW_CHANNEL_S)
        async with asyncio.timeout(5):
            while True:
                with contextlib.suppress(BrokerUnavailable):
                    await publisher.publish(accepted_purchase(event_id, 1))
                    break
                await asyncio.sleep(0.05)
    finally:
        await publisher.close()
        await connection.close()
    assert slowest < 1, f"a publish waited {slowest:.2f} s while the channel was closed"
    assert 2 <= renewed <= 3, f"{renewed} channels opened in 2.5 s"


async def _publish_one_per_turn(
    publisher: PurchasePublisher, purchases: list[AcceptedPurchase]
) -> None:
    """Each purchase submitted one turn of the loop after the one before, as requests reach
    the publisher under a flood, then every confirm awaited."""
    waits = []
    for purchase in purchases:
        waits.append(asyncio.ensure_future(publisher.publish(purchase)))
        await asyncio.sleep(0)
    await asyncio.gather(*waits)


@pytest.mark.parametrize(("linger_s", "one_message"), [(5.0, True), (0.0, False)])
async def test_purchases_arriving_turn_after_turn_are_held_into_one_message_while_they_keep_coming(
    settings: Settings, linger_s: float, one_message: bool
) -> None:
    """With a linger, the sender gives each turn of the loop its chance to add a purchase and
    sends once a turn adds none: twelve purchases a turn apart are one message (well before
    the linger's end). Without it, the first goes out alone."""
    connection = await broker_nodes.connect(settings)
    topology = broker.Topology.from_settings(settings)
    publisher = PurchasePublisher(topology, timeout_s=5, max_in_flight=1, linger_s=linger_s)
    event_id = uuid4()
    purchases = [accepted_purchase(event_id, i) for i in range(12)]
    try:
        await publisher.start(connection)
        async with asyncio.timeout(2):  # a lone turn ends the linger, not its 5 s
            await _publish_one_per_turn(publisher, purchases)
    finally:
        await publisher.close()
        await connection.close()

    bodies = await read_back(settings, topology.queue(topology.partition_of(event_id)))
    messages = [PurchaseMessage.from_body(body).purchases for body in bodies]
    assert [p.purchase_id for m in messages for p in m] == [p.purchase_id for p in purchases]
    assert (len(messages) == 1) is one_message, [len(m) for m in messages]


async def test_a_lone_purchase_is_sent_after_one_turn_not_after_the_linger(
    settings: Settings,
) -> None:
    connection = await broker_nodes.connect(settings)
    publisher = PurchasePublisher(broker.Topology.from_settings(settings), timeout_s=5, linger_s=30)
    try:
        await publisher.start(connection)
        async with asyncio.timeout(2):
            await publisher.publish(accepted_purchase(uuid4(), 0))
    finally:
        await publisher.close()
        await connection.close()


def test_message_ids_are_unique_and_draw_their_randomness_once_per_process() -> None:
    """A message id is a per-process random prefix and a counter: distinct for every message,
    distinct between two processes' sequences, and no system call for randomness per message."""
    ids = publisher_module._message_ids()
    first, second = next(ids), next(ids)
    other = next(publisher_module._message_ids())

    assert first != second
    assert first.rsplit("-", 1)[0] == second.rsplit("-", 1)[0]
    assert other.rsplit("-", 1)[0] != first.rsplit("-", 1)[0]


async def test_a_closed_publisher_refuses_every_publish_and_opens_no_channel_again(
    settings: Settings,
) -> None:
    """A publish that finds the channel closed asks for a new one in the background; once the
    publisher itself is closed (the API stopping) nothing may reopen it, however long after."""
    connection = await broker_nodes.connect(settings)
    publisher = PurchasePublisher(broker.Topology.from_settings(settings), timeout_s=5)
    try:
        await publisher.start(connection)
        await publisher.close()
        for _ in range(3):
            with pytest.raises(BrokerUnavailable):
                await publisher.publish(accepted_purchase(uuid4(), 1))
            # Past the renewal's pace: a channel asked for would be open by now.
            await asyncio.sleep(publisher_module.RENEW_CHANNEL_S + 0.2)
            assert not publisher.is_ready
            assert not publisher.check_ready()
    finally:
        await publisher.close()
        await connection.close()


@pytest.mark.parametrize("spare", [True, False])
async def test_with_cpu_to_spare_a_turns_first_full_message_leaves_as_it_fills(
    settings: Settings, spare: bool
) -> None:
    """Two bursts of thirty purchases, each handed over in one turn of the loop, and a full
    message is 8. While the process has CPU to spare, each burst's first 8 are written to the
    socket as the eighth is handed over, before the turn ends (the broker has them while the
    rest are still being read), and the other 22 go at the turn's end, in order. Without CPU to
    spare, each burst goes as one message at its turn's end."""
    connection = await broker_nodes.connect(settings)
    topology = broker.Topology.from_settings(settings)
    # The machine idles; this process idles too, or is busy every instant it is asked.
    own_cpu = (lambda: 0.0) if spare else time.monotonic
    window = InFlightWindow(maximum=8, cpu=AlwaysIdle(), interval_s=0.0, own_cpu=own_cpu)
    publisher = PurchasePublisher(topology, timeout_s=5, full_batch=8, window=window)
    event_id = uuid4()
    bursts = [[accepted_purchase(event_id, 30 * b + i) for i in range(30)] for b in range(2)]
    written_in_turn = []
    try:
        await publisher.start(connection)
        await publisher.publish(accepted_purchase(event_id, -1))
        for _ in range(8):  # purchases waited for a slot, and the CPU idles: as wide as it goes
            window.waited()
            window.adapt()
        assert (window.size, window.spare) == (8, spare)
        channel = publisher._confirmed.channel  # type: ignore[union-attr]
        for burst in bursts:
            tagged_before = channel.delivery_tag
            waits = [publisher.publish(p) for p in burst]  # one turn: nothing awaited between
            written_in_turn.append(channel.delivery_tag - tagged_before)
            async with asyncio.timeout(5):
                await asyncio.gather(*waits)
    finally:
        await publisher.close()
        await connection.close()

    bodies = await read_back(settings, topology.queue(topology.partition_of(event_id)))
    messages = [PurchaseMessage.from_body(body).purchases for body in bodies][1:]
    assert [p.purchase_id for m in messages for p in m] == [
        p.purchase_id for burst in bursts for p in burst
    ]
    if spare:
        assert written_in_turn == [1, 1]
        assert [len(m) for m in messages] == [8, 22, 8, 22]
    else:
        assert written_in_turn == [0, 0]
        assert [len(m) for m in messages] == [30, 30]


async def test_a_message_sent_early_as_the_sender_stops_still_answers_its_callers(
    settings: Settings,
) -> None:
    """The sender is stopping when a request fills a message and sends it: the task that would
    await its confirm is cancelled before it begins, and its callers are answered 503 all the
    same, never left waiting."""
    connection = await broker_nodes.connect(settings)
    topology = broker.Topology.from_settings(settings)
    window = InFlightWindow(maximum=4, cpu=AlwaysIdle(), interval_s=0.0, own_cpu=lambda: 0.0)
    publisher = PurchasePublisher(topology, timeout_s=5, full_batch=2, window=window)
    event_id = uuid4()
    try:
        await publisher.start(connection)
        await publisher.publish(accepted_purchase(event_id, 0))
        assert window.spare
        sender = publisher._senders[topology.partition_of(event_id)]
        sender._task.cancel()  # stopping: its cancellation runs before anything scheduled now
        waits = [publisher.publish(accepted_purchase(event_id, i)) for i in (1, 2)]
        async with asyncio.timeout(2):
            results = await asyncio.gather(*waits, return_exceptions=True)
    finally:
        await publisher.close()
        await connection.close()
    assert all(isinstance(result, BrokerUnavailable) for result in results), results
