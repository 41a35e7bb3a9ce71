"""What ops read: Prometheus metrics of both services move with traffic, and log lines carry the
context that follows one purchase from the API to the worker."""

import asyncio
import contextlib
import importlib
import json
import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.request import urlopen
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from shared.logs import logging_config
from shared.messages import PurchaseRequested, encode_message
from shared.settings import DEV_PURCHASE_ID_SECRET, Settings
from tests.conftest import StartWorker, api_client, settings_env
from tests.factories import create_event, purchase, wait_until_final
from tests.metrics import free_port, sample
from tests.worker.helpers import partition_of, publish_raw, purchase_message, wait_for

README = Path(__file__).resolve().parent.parent / "README.md"


async def test_api_metrics_count_requests_and_confirmed_publishes(api: httpx.AsyncClient) -> None:
    route = "/events/{event_id}/tickets/purchase"
    before = (await api.get("/metrics")).text
    event = await create_event(api)
    for _ in range(3):
        assert (await purchase(api, event["id"])).status_code == 202
    after = (await api.get("/metrics")).text

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("ticketing_http_requests_total", method="POST", route=route, status="202") == 3
    assert moved("ticketing_http_request_duration_seconds_count", method="POST", route=route) == 3
    assert moved("ticketing_publishes_total", outcome="confirmed") >= 1
    assert moved("ticketing_published_purchases_total") == 3


async def test_answers_given_before_routing_are_counted_under_their_route(
    api: httpx.AsyncClient,
) -> None:
    """A 413 or 415 of the request guard, and a 405, belong to the route the path names: under
    `unmatched` an operator could not tell which route clients get wrong."""
    event = await create_event(api)
    before = (await api.get("/metrics")).text
    form = await api.post("/events", content=b"name=x", headers={"content-type": "text/plain"})
    huge = await api.patch(
        f"/events/{event['id']}",
        content=b"{" + b" " * 70_000 + b"}",
        headers={"content-type": "application/json"},
    )
    wrong_method = await api.put(f"/events/{event['id']}", json={})
    document_posted = await api.post("/openapi.json", json={})
    no_route = await api.get("/nowhere")
    after = (await api.get("/metrics")).text

    def moved(route: str, method: str, status: int) -> float:
        labels = {"method": method, "route": route, "status": str(status)}
        name = "ticketing_http_requests_total"
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert (form.status_code, huge.status_code, wrong_method.status_code) == (415, 413, 405)
    assert moved("/events", "POST", 415) == 1
    assert moved("/events/{event_id}", "PATCH", 413) == 1
    assert moved("/events/{event_id}", "PUT", 405) == 1
    assert document_posted.status_code == 405
    assert moved("/openapi.json", "POST", 405) == 1
    assert no_route.status_code == 404
    assert moved("unmatched", "GET", 404) == 1


async def test_the_partitions_owned_gauge_follows_the_leases_not_the_next_tick(
    settings: Settings, start_worker: StartWorker
) -> None:
    """Operators alert on sum(partitions owned) < PARTITIONS: a lease handed over between two
    ticks must not go on counting for the worker that gave it up."""

    def owned() -> float | None:
        return REGISTRY.get_sample_value("ticketing_worker_partitions_owned")

    worker = await start_worker()

    async def holds_all() -> bool:
        return len(worker.partitions) == settings.partitions

    await wait_for(holds_all, timeout_s=15, what="the worker to take every partition")
    assert owned() == settings.partitions
    worker.stop()

    async def released() -> bool:
        return not worker.partitions

    await wait_for(released, timeout_s=15, what="the worker to hand its partitions back")
    assert owned() == 0


async def test_worker_metrics_endpoint_shows_partitions_and_decided_purchases(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings
) -> None:
    port = free_port()
    env = settings_env(settings)
    env.update({"WORKER_ID": "metrics-worker", "WORKER_METRICS_PORT": str(port)})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", env=env)
    try:
        event = await create_event(api, total_tickets=1)
        ids = [(await purchase(api, event["id"])).json()["purchase_id"] for _ in range(2)]
        await wait_until_final(db, ids)

        def scrape() -> str:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                return str(response.read().decode())

        text = ""
        for _ in range(50):  # until the worker has taken its leases
            with contextlib.suppress(OSError):
                text = await asyncio.to_thread(scrape)
                if sample(text, "ticketing_worker_partitions_owned") == settings.partitions:
                    break
            await asyncio.sleep(0.2)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert sample(text, "ticketing_worker_partitions_owned") == settings.partitions
    assert sample(text, "ticketing_worker_purchases_total", status="confirmed", reason="") == 1
    assert (
        sample(text, "ticketing_worker_purchases_total", status="rejected", reason="sold_out") == 1
    )
    assert sample(text, "ticketing_worker_batch_purchases_count") >= 1
    assert sample(text, "ticketing_worker_commit_seconds_count") >= 1
    assert sample(text, "ticketing_worker_leases_acquired_total") == settings.partitions
    assert 'ticketing_worker_lag_seconds{partition="' in text
    # Only its own: the API's publisher series, always 0 here, would mislead a dashboard.
    assert "ticketing_publish" not in text, "the worker exports the API's publisher metrics"


def test_every_metric_the_services_export_is_in_the_readme() -> None:
    for module in ("api.metrics", "shared.publisher", "worker.metrics"):
        importlib.import_module(module)  # each registers its metrics on import

    section = README.read_text().split("**Metrics** (Prometheus)")[1].split("**Alerts")[0]
    names = {family.name for family in REGISTRY.collect() if family.name.startswith("ticketing_")}
    assert len(names) > 15
    # The table shortens a run of worker counters as `…_lease_takeovers_total`.
    missing = {
        name
        for name in names
        if f"`{name}" not in section and f"`…{name.removeprefix('ticketing_worker')}" not in section
    }
    assert not missing, f"metrics missing from README's table: {sorted(missing)}"


def _lag(partition: int) -> float | None:
    return REGISTRY.get_sample_value("ticketing_worker_lag_seconds", {"partition": str(partition)})


async def test_worker_lag_is_zero_once_its_partition_is_idle_and_leaves_with_the_partition(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
) -> None:
    """A backlog's age must not stay on the gauge once it is drained (README's alert, lag > 30 s
    for 2 min, would fire while nothing waits), nor on a worker that let the partition go."""
    event = await create_event(api)
    partition = partition_of(settings, event["id"])
    late = PurchaseRequested(
        purchase_id=uuid4(),
        event_id=UUID(event["id"]),
        customer_id="customer-late",
        quantity=1,
        accepted_at=datetime.now(UTC) - timedelta(minutes=2),  # queued while no worker ran
    )
    await publish_raw(amqp, settings, partition, encode_message(partition, [late]))
    worker = await start_worker()
    await wait_until_final(db, [late.purchase_id])

    for _ in range(100):  # an idle partition is seen within a second or so
        if _lag(partition) == 0:
            break
        await asyncio.sleep(0.1)
    assert _lag(partition) == 0

    worker.stop()
    for _ in range(100):
        if _lag(partition) is None:
            break
        await asyncio.sleep(0.1)
    assert _lag(partition) is None


async def test_a_dead_letter_set_aside_by_a_worker_is_not_logged_as_undecodable(
    api: httpx.AsyncClient,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    start_worker: StartWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A readable message in the wrong partition's queue is recorded wrong_partition and
    rejected; the dead-letter recorder must not then tell ops it was undecodable."""
    caplog.set_level(logging.INFO, logger="worker")
    event = await create_event(api)
    other = (partition_of(settings, event["id"]) + 1) % settings.partitions
    message = purchase_message(other, event["id"])
    await publish_raw(amqp, settings, other, encode_message(message.partition, message.commands))
    await start_worker()

    [row] = (await wait_until_final(db, [message.purchases[0].purchase_id])).values()
    assert (row["status"], row["reason"]) == ("failed", "wrong_partition")
    for _ in range(100):  # the recorder reads the dead letter in its own time
        recorded = [r for r in caplog.records if r.name == "worker.dead_letters"]
        if recorded:
            break
        await asyncio.sleep(0.1)
    assert recorded
    said = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("worker."))
    assert "undecodable" not in said, said
    assert "set aside by a worker" in said
    # What ops need to find the publisher at fault: the event, and where it routes here.
    [set_aside] = [r for r in caplog.records if "another partition" in r.getMessage()]
    assert set_aside.__dict__["event_ids"] == [event["id"]]
    assert set_aside.__dict__["routes_to"] == [partition_of(settings, event["id"])]
    assert set_aside.__dict__["message_partition"] == other


def _formatter(settings: Settings) -> logging.Formatter:
    config = dict(logging_config(settings, service="worker")["formatters"]["default"])
    module, _, name = config.pop("()").rpartition(".")
    formatter: logging.Formatter = getattr(importlib.import_module(module), name)(**config)
    return formatter


@pytest.mark.parametrize("settings", [{"log_format": "json"}], indirect=True)
async def test_json_log_lines_carry_the_purchase_context(settings: Settings) -> None:
    record = logging.makeLogRecord(
        {
            "name": "worker.consumer",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "purchase decided",
            "purchase_id": "p-1",
            "event_id": "e-1",
            "partition": 3,
        }
    )
    line = json.loads(_formatter(settings).format(record))
    assert line["message"] == "purchase decided"
    assert line["level"] == "INFO"
    assert line["service"] == "worker"
    assert (line["purchase_id"], line["event_id"], line["partition"]) == ("p-1", "e-1", 3)
    assert "time" in line


@pytest.mark.parametrize("settings", [{"log_format": "json"}], indirect=True)
async def test_json_log_lines_of_uvicorn_carry_no_terminal_colour_codes(settings: Settings) -> None:
    # uvicorn adds a copy of its message with ANSI colours as `color_message`.
    record = logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "levelname": "INFO",
            "msg": "Started server process [%d]",
            "args": (42,),
            "color_message": "Started server process [\x1b[36m%d\x1b[0m]",
        }
    )
    text = _formatter(settings).format(record)
    line = json.loads(text)
    assert line["message"] == "Started server process [42]"
    assert "color_message" not in line
    assert "\\u001b" not in text
    assert set(line) == {"time", "level", "logger", "message", "service"}


@pytest.mark.parametrize("settings", [{"log_format": "text"}], indirect=True)
async def test_text_log_lines_are_readable_and_keep_the_context(settings: Settings) -> None:
    record = logging.makeLogRecord(
        {"name": "worker.supervisor", "levelname": "INFO", "msg": "lease released", "partition": 2}
    )
    line = _formatter(settings).format(record)
    assert "lease released" in line
    assert line.endswith("partition=2")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


@pytest.mark.parametrize(
    ("secret", "warned"),
    [
        (DEV_PURCHASE_ID_SECRET, True),
        ("compose-dev-secret-change-me", True),  # docker-compose.yml's default
        ("CHANGE-ME-to-a-long-random-string", True),  # deploy/k8s/secret.example.yaml's
        ("a5f0c3e1-real-secret-9b7d2e6f4a1c", False),
    ],
)
async def test_a_placeholder_purchase_id_secret_is_warned_about_at_start(
    settings: Settings, caplog: pytest.LogCaptureFixture, secret: str, warned: bool
) -> None:
    """With a secret anybody can read, anybody can forge purchase ids: ops must hear of it."""
    caplog.set_level(logging.WARNING, logger="api.resources")
    async with api_client(settings.model_copy(update={"purchase_id_secret": secret})) as api:
        assert (await api.get("/healthz")).status_code == 200
    said = [r.getMessage() for r in caplog.records if r.name == "api.resources"]
    assert any("PURCHASE_ID_SECRET is a placeholder" in m for m in said) == warned, said
