"""The publisher never leaves a caller waiting: a bug in a send fails its callers with a 503."""

import asyncio
import logging
from datetime import UTC, datetime
from uuid import uuid4

import pytest

from shared import broker
from shared.errors import BrokerUnavailable
from shared.messages import PurchaseRequested
from shared.publisher import PurchasePublisher
from shared.settings import Settings


async def test_a_bug_while_sending_fails_the_callers_instead_of_hanging_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in building the message")

    connection = await broker.connect(settings)
    publisher = PurchasePublisher(broker.Topology.from_settings(settings), timeout_s=5)
    try:
        await publisher.start(connection)
        monkeypatch.setattr("shared.publisher.amqp_message", broken)
        event_id = uuid4()
        purchases = [
            PurchaseRequested(
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
