"""`make bench` / `make bench-quick`: a flash sale against the synchronous design, in one run.

Starts every process it measures itself (API, workers, the baseline app, the bare app) against
the local PostgreSQL and RabbitMQ, in a database and broker namespace of its own (`ticketing_bench`,
`bench`), prints one table, writes the figures to bench/results/ (JSON) and draws a PNG chart.

    python -m bench.run [--quick]
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.request import urlopen

import aio_pika
import asyncpg
import orjson

from bench.cpu import CpuMeter, cpu_seconds, postgres_postmasters, rabbitmq_nodes
from bench.holds import sell_out_with_holds
from bench.loadgen import LoadResult, run_load
from bench.processes import Processes, bench_settings, peak_rss_mb, wait_http
from bench.report import RESULTS, draw_chart, print_table, report
from bench.sizes import (
    COALESCED,
    FULL,
    HOLD_S,
    QUICK,
    SPREAD_CONNECTIONS,
    SPREAD_EVENTS,
    STATUS_BUYERS,
    Sizes,
)
from bench.status_push import (
    CommitClock,
    ReleaseClock,
    hold_waiters,
    requests_per_purchase,
    wait_estimates,
)
from shared import broker, broker_nodes
from shared.messages import AcceptedPurchase, encode_message
from shared.migrate import create_database_if_missing, drop_database
from shared.migrate import migrate as apply_schema
from shared.purchases.ids import PurchaseIds
from tests.broker_cluster import BrokerCluster

# Connections of the accept measurements: a browser crowd on a small box, and four times that.
ACCEPT_CONNECTIONS = (64, 256)
# Purchases per message of the held waiters' backlog: what the API packed at 64 connections
# before its sender lingered, which set the pace the status targets were first measured at.
WAITERS_PER_MESSAGE = 16
# The answer floor's server (bench/answer_floor.py), beside the API's port.
ANSWER_FLOOR_PORT = 8804
# Rounds of the accept measurements; each figure is its median round.
ACCEPT_ROUNDS = 5
# Ports of the accept measurements' references, beside the API's.
RAW_PORT = 8803
BARE_PORT = 8805


class Bench:
    def __init__(self, sizes: Sizes, http_processes: int) -> None:
        self.sizes = sizes
        self.http_processes = http_processes
        self.settings = bench_settings()
        self.topology = broker.Topology.from_settings(self.settings)
        self.procs = Processes(self.settings, http_processes)
        self.pool: asyncpg.Pool | None = None
        self.figures: dict[str, dict[str, Any]] = {}

    # -- setup ------------------------------------------------------------------------------

    async def setup(self) -> None:
        drop_database(self.settings.database_url)
        create_database_if_missing(self.settings.database_url)
        apply_schema(self.settings)
        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=1, max_size=4)
        connection = await aio_pika.connect(self.settings.rabbitmq_url)
        channel = await connection.channel()
        await broker.delete_topology(channel, self.topology)
        await broker.declare_topology(connection, self.topology)
        await connection.close()

    async def teardown(self) -> None:
        self.procs.stop_all()
        if self.pool is not None:
            await self.pool.close()
        connection = await aio_pika.connect(self.settings.rabbitmq_url)
        channel = await connection.channel()
        await broker.delete_topology(channel, self.topology)
        await connection.close()
        drop_database(self.settings.database_url)

    @property
    def db(self) -> asyncpg.Pool:
        assert self.pool is not None
        return self.pool

    async def reset(self) -> None:
        await self.db.execute(
            "TRUNCATE purchases, events, workers; UPDATE partition_leases "
            "SET owner = NULL, expires_at = NULL"
        )
        connection = await aio_pika.connect(self.settings.rabbitmq_url)
        channel = await connection.channel()
        for partition in range(self.topology.partitions):
            queue = await channel.get_queue(self.topology.queue(partition))
            await queue.purge()
        await connection.close()

    async def create_events(self, count: int, tickets: int) -> list[uuid.UUID]:
        ids = [uuid.uuid4() for _ in range(count)]
        await self.db.execute(
            """
            INSERT INTO events (id, name, starts_at, total_tickets, available_tickets,
                                max_tickets_per_purchase)
            SELECT id, 'bench', now() + interval '30 days', $2, $2, 10 FROM unnest($1::uuid[]) id
            """,
            ids,
            tickets,
        )
        return ids

    async def prefill(
        self, event_ids: list[uuid.UUID], count: int, *, per_message: int = 1
    ) -> list[uuid.UUID]:
        """Queue `count` purchases spread over `event_ids`, in the API's message format: one per
        message (the worst case for the worker), or `per_message` of one event per message (as
        the API coalesces concurrent purchases of a partition under a flood). Their ids are
        issued as the API issues them (so the API answers their status), and returned."""
        connection = await aio_pika.connect(self.settings.rabbitmq_url)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.topology.exchange)
        now = datetime.now(UTC)
        issue = PurchaseIds(self.settings.purchase_id_secret)
        issued: list[uuid.UUID] = []

        async def publish(i: int) -> None:
            event_id = event_ids[i % len(event_ids)]
            partition = self.topology.partition_of(event_id)
            purchases = [
                AcceptedPurchase(
                    purchase_id=issue.new(),
                    event_id=event_id,
                    customer_id=f"c{i}-{n}",
                    quantity=1,
                    accepted_at=now,
                )
                for n in range(per_message)
            ]
            issued.extend(p.purchase_id for p in purchases)
            await exchange.publish(
                broker.amqp_message(encode_message(partition, purchases)),
                routing_key=self.topology.routing_key(partition),
            )

        messages = count // per_message
        for start in range(0, messages, 2000):
            await asyncio.gather(*(publish(i) for i in range(start, min(start + 2000, messages))))
        await connection.close()
        return issued

    async def wait_final(self, expected: int, timeout_s: float = 600.0) -> float:
        """Seconds from the first decided purchase until `expected` are decided."""
        # The start is exact: the first batch's transaction time, as the worker stored it. The
        # end is when a poll sees the last one, so at most one poll late: a conservative figure.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            decided = await self.db.fetchval("SELECT count(*) FROM purchases")
            if decided >= expected:
                end = time.time()
                first = await self.db.fetchval(
                    "SELECT extract(epoch FROM min(processed_at))::float8 FROM purchases"
                )
                return float(end - first)
            await asyncio.sleep(0.05)  # count(*) is not free: poll gently
        raise RuntimeError(f"only {decided} of {expected} purchases decided in {timeout_s} s")

    async def check_no_oversell(self) -> dict[str, int]:
        """available + held + confirmed = total over every event, none negative (or raise)."""
        row = await self.db.fetchrow(
            """
            SELECT coalesce(sum(e.total_tickets), 0) AS total,
                   coalesce(sum(e.available_tickets), 0) AS available,
                   (SELECT coalesce(sum(quantity), 0) FROM purchases WHERE status = 'confirmed')
                       AS confirmed,
                   (SELECT coalesce(sum(quantity), 0) FROM purchases WHERE status = 'held')
                       AS held,
                   (SELECT count(*) FROM purchases WHERE status = 'rejected') AS rejected,
                   (SELECT count(*) - count(DISTINCT id) FROM purchases) AS duplicated,
                   (SELECT count(*) FROM events WHERE available_tickets < 0) AS negative
            FROM events e
            """
        )
        assert row is not None  # an aggregate always returns a row
        figures = {key: int(value) for key, value in row.items()}
        taken = figures["confirmed"] + figures["held"]
        figures["oversold"] = max(0, taken - figures["total"])
        if taken + figures["available"] != figures["total"] or figures["negative"]:
            raise AssertionError(f"INVARIANT BROKEN: {figures}")
        return figures

    # -- scenarios --------------------------------------------------------------------------

    async def baseline(self) -> None:
        """The synchronous design under the flash-sale load."""
        await self.reset()
        (event_id,) = await self.create_events(1, self.sizes.flash_tickets)
        proc = self.procs.uvicorn("bench.baseline_app:app", 8802)
        try:
            load = await run_load(
                "http://127.0.0.1:8802",
                purchase_request(event_id),
                total=self.sizes.baseline_requests,
                concurrency=self.sizes.flash_concurrency,
            )
        finally:
            self.procs.stop(proc)
        check = await self.check_no_oversell()
        self.figures["baseline"] = {
            "purchases_per_s": load.rate,
            "requests": load.requests,
            "seconds": load.seconds,
            "p50_ms": load.percentile(0.5) * 1000,
            "p99_ms": load.percentile(0.99) * 1000,
            "statuses": dict(load.statuses),
            "loadgen_cpu_share": load.cpu_share,
            **check,
        }

    async def hot_drain(self, workers: int, per_message: int = 1) -> None:
        await self.reset()
        (event_id,) = await self.create_events(1, self.sizes.drain)
        await self.prefill([event_id], self.sizes.drain, per_message=per_message)
        meter = self._pipeline_meter({})
        meter.start()
        procs = [self.procs.worker(f"bench-{i}") for i in range(workers)]
        try:
            seconds = await self.wait_final(self.sizes.drain)
            rss = max(peak_rss_mb(p) for p in procs)
            cpu = {"workers": cpu_seconds(p.pid for p in procs)} | meter.stop()
        finally:
            for proc in procs:
                self.procs.stop(proc)
        check = await self.check_no_oversell()
        key = f"hot_drain_{workers}w" + (f"_{per_message}_per_message" if per_message > 1 else "")
        self.figures[key] = {
            "purchases_per_s": self.sizes.drain / seconds,
            "purchases": self.sizes.drain,
            "purchases_per_message": per_message,
            "seconds": seconds,
            "worker_peak_rss_mb": rss,
            # Where the drain's CPU went: the workers from their start (their start-up
            # included), RabbitMQ and PostgreSQL over the same span.
            "cpu_us_per_purchase": {k: 1e6 * v / self.sizes.drain for k, v in cpu.items()},
            **check,
        }

    async def many_events(self, workers: int) -> None:
        await self.reset()
        event_ids = await self.create_events(self.sizes.many_events, 1_000)
        random.shuffle(event_ids)
        await self.prefill(event_ids, self.sizes.many_purchases)
        procs = [self.procs.worker(f"bench-{i}") for i in range(workers)]
        try:
            seconds = await self.wait_final(self.sizes.many_purchases)
        finally:
            for proc in procs:
                self.procs.stop(proc)
        check = await self.check_no_oversell()
        self.figures[f"many_events_{workers}w"] = {
            "purchases_per_s": self.sizes.many_purchases / seconds,
            "purchases": self.sizes.many_purchases,
            "events": self.sizes.many_events,
            "seconds": seconds,
            **check,
        }

    async def api_accept(self) -> None:
        """The accept path against two references, at each load of ACCEPT_CONNECTIONS: the raw
        ASGI ceiling (no framework: read, parse, 202) and a bare FastAPI endpoint (validate,
        202). Each app's CPU per answered request comes from /proc.

        The three apps run side by side and take turns, load after load, for ACCEPT_ROUNDS
        rounds, each round on an empty queue. The API and the raw ceiling go back to back (in
        alternating order), and each ratio to the ceiling is the median of the rounds' ratios:
        this machine's speed drifts by half within minutes (its neighbours' load), so only two
        loads measured seconds apart compare the apps rather than two moments of the machine.
        Each app's own figures are its median round."""
        rounds: dict[str, list[dict[str, Any]]] = {}
        api = self.procs.api()
        apps = {
            "api": (api, self.settings.api_port),
            "raw": (self.procs.uvicorn("bench.raw_app:app", RAW_PORT, ready_path="/"), RAW_PORT),
            "bare": (self.procs.uvicorn("bench.bare_app:app", BARE_PORT), BARE_PORT),
        }
        try:
            for round_ in range(ACCEPT_ROUNDS):
                turns = ("api", "raw", "bare") if round_ % 2 == 0 else ("raw", "api", "bare")
                for connections in ACCEPT_CONNECTIONS:
                    await self.reset()
                    (event_id,) = await self.create_events(1, 1_000_000)
                    for name in turns:
                        proc, port = apps[name]
                        load = await self._accept_load(proc.pid, event_id, connections, port=port)
                        rounds.setdefault(self._accept_key(name, connections), []).append(load)
            peak_rss = peak_rss_mb(api)
        finally:
            for proc, _ in apps.values():
                self.procs.stop(proc)
        for key, measured in rounds.items():
            by_rate = sorted(measured, key=lambda load: load["accepted_per_s"])
            self.figures[key] = {
                **by_rate[len(by_rate) // 2],
                "rounds_accepted_per_s": [load["accepted_per_s"] for load in measured],
            }
        for connections in ACCEPT_CONNECTIONS:
            self.figures[self._accept_key("api", connections)].update(
                paired_ratios(
                    rounds[self._accept_key("api", connections)],
                    rounds[self._accept_key("raw", connections)],
                )
            )
        self.figures["api_accept"]["api_peak_rss_mb"] = peak_rss
        await self.reset()

    @staticmethod
    def _accept_key(app: str, connections: int) -> str:
        return f"{app}_accept" + ("" if connections == ACCEPT_CONNECTIONS[0] else f"_{connections}")

    async def _accept_load(
        self, root_pid: int, event_id: uuid.UUID, connections: int, *, port: int | None = None
    ) -> dict[str, Any]:
        port = port or self.settings.api_port
        before = cpu_seconds([root_pid])
        load = await run_load(
            f"http://127.0.0.1:{port}",
            purchase_request(event_id),
            duration_s=self.sizes.accept_s,
            concurrency=connections,
        )
        cpu = cpu_seconds([root_pid]) - before
        answered = load.statuses.get(202, 0)
        return {
            **load_figures(load),
            "connections": connections,
            "accepted_per_s": answered / load.seconds if load.seconds else 0.0,
            "cpu_cores": cpu / load.seconds if load.seconds else 0.0,
            "cpu_ms_per_request": 1000 * cpu / answered if answered else 0.0,
        }

    async def status_polls(self) -> None:
        """What a browser does after its 202: poll GET /purchases/{id}. Measured on decided
        purchases (the common case once the queue drains), API and a worker running."""
        await self.reset()
        (event_id,) = await self.create_events(1, 1_000_000)
        api = self.procs.api()
        worker = self.procs.worker("bench-polls")
        base = f"http://127.0.0.1:{self.settings.api_port}"
        try:
            submitted = await run_load(
                base, purchase_request(event_id), total=2_000, concurrency=64, keep_bodies=True
            )
            ids = [orjson.loads(body)["purchase_id"] for body in submitted.bodies]
            await self.wait_final(len(ids))

            def poll(i: int) -> tuple[str, str, bytes]:
                return "GET", f"/purchases/{ids[i % len(ids)]}", b""

            load = await run_load(base, poll, duration_s=self.sizes.accept_s, concurrency=64)
        finally:
            self.procs.stop(worker)
            self.procs.stop(api)
        self.figures["status_polls"] = load_figures(load)

    async def spread(self) -> None:
        """Many events on sale at once (SPREAD_EVENTS, a random one per request, one ticket),
        the synchronous baseline against this design, at each of SPREAD_CONNECTIONS. The rate
        is purchases confirmed in the database per second, end to end: for this design, from
        the first request until the worker has decided the last one accepted."""
        for connections in SPREAD_CONNECTIONS:
            await self.reset()
            event_ids = await self.create_events(SPREAD_EVENTS, 100_000)
            proc = self.procs.uvicorn("bench.baseline_app:app", 8802)
            meter = self._pipeline_meter({"baseline": proc.pid})
            try:
                meter.start()
                load = await run_load(
                    "http://127.0.0.1:8802",
                    spread_request(event_ids),
                    duration_s=self.sizes.spread_s,
                    concurrency=connections,
                )
                cpu = meter.stop()
            finally:
                self.procs.stop(proc)
            self.figures[f"spread_baseline_{connections}"] = await self._spread_figures(
                load, load.seconds, cpu, connections
            )

            await self.reset()
            event_ids = await self.create_events(SPREAD_EVENTS, 100_000)
            api = self.procs.api()
            worker = self.procs.worker("bench-spread")
            meter = self._pipeline_meter({"api": api.pid, "worker": worker.pid})
            try:
                meter.start()
                started = time.perf_counter()
                load = await run_load(
                    f"http://127.0.0.1:{self.settings.api_port}",
                    spread_request(event_ids),
                    duration_s=self.sizes.spread_s,
                    concurrency=connections,
                )
                await self.wait_final(load.statuses.get(202, 0))
                seconds = time.perf_counter() - started
                cpu = meter.stop()
                worker_rss = peak_rss_mb(worker)
                coalesced = publish_batch_average(self.settings.api_port)
            finally:
                self.procs.stop(worker)
                self.procs.stop(api)
            figures = await self._spread_figures(load, seconds, cpu, connections)
            figures["publish_purchases_per_message"] = coalesced
            figures["worker_peak_rss_mb"] = worker_rss
            figures["commits"] = await self.db.fetchval(
                "SELECT count(DISTINCT processed_at) FROM purchases"
            )
            self.figures[f"spread_{connections}"] = figures

    @staticmethod
    def _pipeline_meter(
        roots: dict[str, int], rabbitmq: Callable[[], list[int]] = rabbitmq_nodes
    ) -> CpuMeter:
        """CPU of the processes started here (by root pid), RabbitMQ's and PostgreSQL's."""
        own = {name: (lambda pid=pid: [pid]) for name, pid in roots.items()}
        return CpuMeter({**own, "rabbitmq": rabbitmq, "postgresql": postgres_postmasters})

    async def _spread_figures(
        self, load: LoadResult, seconds: float, cpu: dict[str, float], connections: int
    ) -> dict[str, Any]:
        check = await self.check_no_oversell()
        confirmed: int = await self.db.fetchval(
            "SELECT count(*) FROM purchases WHERE status = 'confirmed'"
        )
        return {
            **load_figures(load),
            "connections": connections,
            "confirmed": confirmed,
            "seconds_until_all_final": seconds,
            "confirmed_per_s": confirmed / seconds,
            "cpu_s": cpu,
            "cpu_ms_per_confirmed": {k: 1000 * v / confirmed for k, v in cpu.items()}
            | {"total": 1000 * sum(cpu.values()) / confirmed},
            "oversold": check["oversold"],
            "duplicated": check["duplicated"],
        }

    async def flash_sale(self) -> None:
        self.figures["flash_sale"] = await self._flash_sale(self.procs)

    async def flash_sale_on_a_cluster(self) -> None:
        """The same flash sale with RabbitMQ a 3-node cluster (quorum queues replicated on all
        three): the price of replication, next to the single node's figures."""
        cluster = BrokerCluster()
        started_here = await asyncio.to_thread(cluster.up)
        settings = self.settings.model_copy(
            update={"rabbitmq_url": cluster.urls(), "quorum_replicas": 3}
        )
        topology = broker.Topology.from_settings(settings)
        connection = await broker_nodes.connect(settings)
        try:
            await broker.delete_topology(await connection.channel(), topology)
            await broker.declare_topology(connection, topology)
            figures = await self._flash_sale(
                Processes(settings, self.http_processes),
                rabbitmq=lambda: rabbitmq_nodes(node.pid_file for node in cluster.nodes),
            )
            await broker.delete_topology(await connection.channel(), topology)
        finally:
            await connection.close()
            if started_here:
                await asyncio.to_thread(cluster.down)
        single = self.figures.get("flash_sale")
        if single is not None:
            figures["vs_single_node"] = figures["purchases_per_s"] / single["purchases_per_s"]
        self.figures["flash_sale_cluster"] = figures

    async def _flash_sale(
        self, procs: Processes, rabbitmq: Callable[[], list[int]] = rabbitmq_nodes
    ) -> dict[str, Any]:
        await self.reset()
        (event_id,) = await self.create_events(1, self.sizes.flash_tickets)
        api = procs.api()
        worker = procs.worker("bench-flash")
        # The whole pipeline: every process a purchase passes through on its way to the database.
        meter = self._pipeline_meter({"api": api.pid, "worker": worker.pid}, rabbitmq)
        try:
            meter.start()
            started = time.perf_counter()
            load = await run_load(
                f"http://127.0.0.1:{self.settings.api_port}",
                purchase_request(event_id),
                total=self.sizes.flash_requests,
                concurrency=self.sizes.flash_concurrency,
            )
            accepted = load.statuses.get(202, 0)
            await self.wait_final(accepted)
            seconds = time.perf_counter() - started
            cpu = meter.stop()
            api_rss, worker_rss = peak_rss_mb(api), peak_rss_mb(worker)
            coalesced = publish_batch_average(self.settings.api_port)
        finally:
            procs.stop(worker)
            procs.stop(api)
        check = await self.check_no_oversell()
        confirmed_purchases = await self.db.fetchval(
            "SELECT count(*) FROM purchases WHERE status = 'confirmed'"
        )
        return {
            "purchases_per_s": self.sizes.flash_requests / seconds,
            "requests": self.sizes.flash_requests,
            "seconds_until_all_final": seconds,
            "accepted_202": accepted,
            "fast_rejected_409": load.statuses.get(409, 0),
            "unavailable_503": load.statuses.get(503, 0),
            "statuses": dict(load.statuses),
            "p50_ms": load.percentile(0.5) * 1000,
            "p99_ms": load.percentile(0.99) * 1000,
            "loadgen_cpu_share": load.cpu_share,
            "api_peak_rss_mb": api_rss,
            "worker_peak_rss_mb": worker_rss,
            "publish_purchases_per_message": coalesced,
            "pipeline_cpu_s": cpu,
            "pipeline_cpu_ms_per_confirmed": {
                name: 1000 * value / confirmed_purchases for name, value in cpu.items()
            }
            | {"total": 1000 * sum(cpu.values()) / confirmed_purchases},
            **check,
        }

    async def flash_sale_with_holds(self) -> None:
        """Holds given, a random third never paid: expired and sold again, until sold out."""
        await self.reset()
        (event_id,) = await self.create_events(1, self.sizes.holds_tickets)
        await self.db.execute("UPDATE events SET hold_seconds = $1", HOLD_S)
        api = self.procs.api()
        worker = self.procs.worker("bench-holds")
        try:
            crowd = await sell_out_with_holds(
                f"http://127.0.0.1:{self.settings.api_port}",
                self.db,
                event_id,
                tickets=self.sizes.holds_tickets,
                buyers=self.sizes.holds_buyers,
            )
        finally:
            self.procs.stop(worker)
            self.procs.stop(api)
        check = await self.check_no_oversell()
        outcome = await self.db.fetchrow(
            """
            SELECT count(*) FILTER (WHERE hold_expires_at IS NOT NULL) AS holds_given,
                   count(*) FILTER (WHERE status = 'expired') AS holds_expired,
                   count(*) FILTER (WHERE status = 'rejected') AS rejected_by_worker
            FROM purchases
            """
        )
        assert outcome is not None
        self.figures["flash_holds"] = {
            **crowd,
            "hold_seconds": HOLD_S,
            "tickets_sold": check["confirmed"],
            **{key: int(value) for key, value in outcome.items()},
            **check,
        }

    async def status_push(self) -> None:
        """What following a purchase costs: status requests per purchase, polling against
        long-poll; then decision-to-client latency and API RSS with `waiters` requests held."""
        base = f"http://127.0.0.1:{self.settings.api_port}"
        for key, long_poll in (("status_polling", False), ("status_long_poll", True)):
            await self.reset()
            (event_id,) = await self.create_events(1, 1_000_000)
            api = self.procs.api()
            worker = self.procs.worker("bench-status")
            try:
                self.figures[key] = await requests_per_purchase(
                    base,
                    str(event_id),
                    purchases=self.sizes.status_purchases,
                    buyers=STATUS_BUYERS,
                    long_poll=long_poll,
                )
            finally:
                self.procs.stop(worker)
                self.procs.stop(api)
        for key, sse in (("waiters_long_poll", False), ("waiters_sse", True)):
            self.figures[key] = await self._waiters(sse=sse, paced=False)
            self.figures[f"{key}_paced"] = await self._waiters(sse=sse, paced=True)
        for key, sse in (("floor_long_poll", False), ("floor_sse", True)):
            self.figures[key] = await self._answer_floor(sse=sse)
        self.figures["wait_estimates"] = await self._wait_estimates()

    async def _wait_estimates(self) -> dict[str, Any]:
        await self.reset()
        (event_id,) = await self.create_events(1, 1_000_000)
        api = self.procs.api()
        # One message per commit: a worker slower than a modest flow, so a backlog builds up.
        worker = self.procs.worker("bench-estimates", BATCH_SIZE="1", BATCH_MAX_WAIT_MS="0")

        async def decided_count() -> int:
            return int(await self.db.fetchval("SELECT count(*) FROM purchases"))

        async def read_decided(ids: list[str]) -> dict[str, float]:
            deadline = time.monotonic() + 120
            while True:
                rows = await self.db.fetch(
                    "SELECT id::text AS id, extract(epoch FROM processed_at)::float8 AS at "
                    "FROM purchases WHERE id = ANY($1::uuid[])",
                    ids,
                )
                if len(rows) == len(ids) or time.monotonic() > deadline:
                    return {row["id"]: row["at"] for row in rows}
                await asyncio.sleep(0.5)

        try:
            return await wait_estimates(
                f"http://127.0.0.1:{self.settings.api_port}",
                str(event_id),
                overload=1.3,
                observe_s=self.sizes.estimate_s,
                decided_count=decided_count,
                read_decided=read_decided,
            )
        finally:
            self.procs.stop(worker)
            self.procs.stop(api)

    async def _waiters(self, *, sse: bool, paced: bool) -> dict[str, Any]:
        """`waiters` requests held on one API process, then their purchases decided: in one
        burst (a backlog of them all, decided in a few commits of 500 messages), or at a steady
        pace (a worker committing one message at a time, as when it keeps up with a flow). The
        backlog is queued directly, WAITERS_PER_MESSAGE purchases per message, so the pace is
        the same whatever the API's publisher packs."""
        await self.reset()
        (event_id,) = await self.create_events(1, 1_000_000)
        base = f"http://127.0.0.1:{self.settings.api_port}"
        api = self.procs.api()
        started: list[subprocess.Popen[bytes]] = []

        async def start_deciding() -> None:
            pace = {"BATCH_SIZE": "1", "BATCH_MAX_WAIT_MS": "0"} if paced else {}
            started.append(self.procs.worker("bench-waiters", **pace))

        try:
            queued = await self.prefill(
                [event_id], self.sizes.waiters, per_message=WAITERS_PER_MESSAGE
            )
            ids = [str(purchase_id) for purchase_id in queued]
            with CommitClock(self.settings.database_url) as commits:
                return await hold_waiters(
                    base,
                    ids,
                    sse=sse,
                    start_deciding=start_deciding,
                    sample_rss=lambda: peak_rss_mb(api),
                    commits=commits,
                )
        finally:
            for worker in started:
                self.procs.stop(worker)
            self.procs.stop(api)

    async def _answer_floor(self, *, sse: bool) -> dict[str, Any]:
        """As many waiters, read by the same client, from a server that answers them all in one
        tight loop, one socket write each (bench/answer_floor.py): the least any server could
        take on this machine to deliver a burst of that many decisions."""
        port = ANSWER_FLOOR_PORT
        base = f"http://127.0.0.1:{port}"
        proc = self.procs.start("-m", "bench.answer_floor", str(port))
        try:
            wait_http(f"{base}/ready")
            ids = [str(uuid.uuid4()) for _ in range(self.sizes.waiters)]
            clock = ReleaseClock(base, ids)
            figures = await hold_waiters(
                base,
                ids,
                sse=sse,
                start_deciding=clock.release,
                sample_rss=lambda: peak_rss_mb(proc),
                commits=clock,
            )
            figures["floor_rss_mb_with_waiters"] = figures.pop("api_rss_mb_with_waiters")
            return figures
        finally:
            self.procs.stop(proc)


def publish_batch_average(port: int) -> float:
    """Purchases per message the API's publisher packed (one API process's /metrics)."""
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("_sum", "_count"):
            if line.startswith(f"ticketing_publish_message_purchases{name} "):
                values[name] = float(line.split()[-1])
    return values["_sum"] / values["_count"] if values.get("_count") else 0.0


def spread_request(event_ids: list[uuid.UUID]) -> Callable[[int], tuple[str, str, bytes]]:
    """One ticket of an event drawn at random (seeded: both designs get the same draw)."""
    paths = [f"/events/{event_id}/tickets/purchase" for event_id in event_ids]
    draw = random.Random(15)

    def make(i: int) -> tuple[str, str, bytes]:
        body = orjson.dumps({"customer_id": f"customer-{i}", "quantity": 1})
        return "POST", draw.choice(paths), body

    return make


def purchase_request(event_id: uuid.UUID) -> Callable[[int], tuple[str, str, bytes]]:
    path = f"/events/{event_id}/tickets/purchase"

    def make(i: int) -> tuple[str, str, bytes]:
        return "POST", path, orjson.dumps({"customer_id": f"customer-{i}", "quantity": 1})

    return make


def paired_ratios(api: list[dict[str, Any]], raw: list[dict[str, Any]]) -> dict[str, Any]:
    """The API's accept rate and CPU per request over the raw ceiling's, round by round (each
    pair measured back to back), and their medians."""

    def per_round(figure: str) -> list[float]:
        return [float(a[figure] / r[figure]) for a, r in zip(api, raw, strict=True)]

    rates, cpus = per_round("accepted_per_s"), per_round("cpu_ms_per_request")
    return {
        "vs_raw": statistics.median(rates),
        "rounds_vs_raw": rates,
        "cpu_vs_raw": statistics.median(cpus),
        "rounds_cpu_vs_raw": cpus,
    }


def load_figures(load: LoadResult) -> dict[str, Any]:
    return {
        "requests_per_s": load.rate,
        "requests": load.requests,
        "p50_ms": load.percentile(0.5) * 1000,
        "p99_ms": load.percentile(0.99) * 1000,
        "statuses": dict(load.statuses),
        "loadgen_cpu_share": load.cpu_share,
    }


def steps_of(bench: "Bench") -> dict[str, tuple[str, Callable[[], Awaitable[None]]]]:
    """Every scenario by its short name (for --only), in the order a full run measures them."""
    return {
        "baseline": ("baseline", bench.baseline),
        "drain": ("hot-event drain, 1 worker", lambda: bench.hot_drain(1)),
        "drain2": ("hot-event drain, 2 workers", lambda: bench.hot_drain(2)),
        "drain-coalesced": (
            f"hot-event drain, 1 worker, {COALESCED} purchases per message",
            lambda: bench.hot_drain(1, COALESCED),
        ),
        "many": ("many events, 1 worker", lambda: bench.many_events(1)),
        "many2": ("many events, 2 workers", lambda: bench.many_events(2)),
        "accept": ("API accept vs bare endpoint", bench.api_accept),
        "polls": ("status polls", bench.status_polls),
        "flash": ("flash sale end to end", bench.flash_sale),
        "spread": (
            f"{SPREAD_EVENTS} events on sale at once, baseline and this design",
            bench.spread,
        ),
        "flash-cluster": (
            "flash sale end to end on a 3-node RabbitMQ cluster",
            bench.flash_sale_on_a_cluster,
        ),
        "holds": ("flash sale with holds (a third never paid)", bench.flash_sale_with_holds),
        "status": ("status: polling against long-poll, and waiters held", bench.status_push),
    }


async def main(quick: bool, http_processes: int, only: list[str]) -> None:
    sizes = QUICK if quick else FULL
    bench = Bench(sizes, http_processes)
    steps = steps_of(bench)
    await bench.setup()
    try:
        for key, (name, step) in steps.items():
            if only and key not in only:
                continue
            print(f"== {name}", flush=True)
            await step()
    finally:
        await bench.teardown()
    if only:  # a partial run: figures only, the recorded results stay as they are
        print(json.dumps(bench.figures, indent=2))
        return
    result = report(bench.figures, sizes, quick)
    result["http_processes"] = http_processes
    RESULTS.mkdir(exist_ok=True)
    stem = f"bench-{'quick' if quick else 'full'}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    draw_chart(result, RESULTS / f"{stem}.png")
    print_table(result)
    print(f"\nwritten: {RESULTS / (stem + '.json')}, {RESULTS / (stem + '.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute here")
    parser.add_argument(
        "--http-processes",
        type=int,
        default=int(os.environ.get("BENCH_HTTP_PROCESSES", "1")),
        help="uvicorn processes for every HTTP app measured (API, baseline, raw, bare); the "
        "default, 1, is how the API is deployed (one process per container)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        choices=[
            "baseline",
            "drain",
            "drain2",
            "drain-coalesced",
            "many",
            "many2",
            "accept",
            "polls",
            "flash",
            "flash-cluster",
            "spread",
            "holds",
            "status",
        ],
        help="measure just these scenarios and print their figures (nothing is written)",
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.quick, args.http_processes, args.only))
