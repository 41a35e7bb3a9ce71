"""The pre-flight check's declaration of the queues. Queues left with other arguments stop the
start with one line (tests/test_cli_errors.py); a declaration the broker breaks off does not:
the service declares the queues again as it connects, retrying."""

import logging

import pytest
from aio_pika.abc import AbstractConnection

from shared import broker, preflight
from shared.settings import Settings


async def test_a_declaration_the_broker_breaks_off_does_not_stop_the_start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    declare = broker.declare_topology

    async def cut_off(connection: AbstractConnection, topology: broker.Topology) -> None:
        await connection.close()  # as a node stopping under it (a rolling restart) would
        await declare(connection, topology)

    monkeypatch.setattr(broker, "declare_topology", cut_off)

    with caplog.at_level(logging.WARNING, logger="shared.preflight"):
        await preflight.check_broker(settings, wait_s=0, declare=True)

    assert "declaring the queues failed for now" in caplog.text
