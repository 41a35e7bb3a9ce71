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
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import aio_pika
import asyncpg
import orjson

from bench.loadgen import LoadResult, run_load
from shared import broker
from shared.messages import PurchaseMessage, PurchaseRequested
from shared.migrate import create_database_if_missing, drop_database
from shared.migrate import migrate as apply_schema
from shared.publisher import amqp_message
from shared.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
# Purchases per message in the coalesced drain: what the API's publisher packs under a flood of
# one event (the flash sale reports its measured average as publish_purchases_per_message).
COALESCED = 32
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    drain: int  # purchases queued for one hot event
    accept_s: float  # seconds of load per accept measurement
    flash_requests: int
    flash_tickets: int
    flash_concurrency: int
    baseline_requests: int
    many_events: int
    many_purchases: int


FULL = Sizes(100_000, 10.0, 50_000, 20_000, 256, 50_000, 1_000, 100_000)
QUICK = Sizes(20_000, 3.0, 10_000, 4_000, 256, 10_000, 1_000, 20_000)


def bench_settings() -> Settings:
    base = Settings()
    url = base.database_url.rsplit("/", 1)[0] + "/ticketing_bench"
    return base.model_copy(
        update={
            "database_url": url,
            "broker_namespace": "bench",
            "api_port": 8801,
            "log_level": "WARNING",
            "worker_metrics_port": 0,
            "purchase_id_secret": "bench-secret-" + uuid.uuid4().hex,
        }
    )


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
    env.update(extra)
    return env


class Processes:
    """The processes under measurement; every one is stopped at the end, whatever happens."""

    def __init__(self, settings: Settings, http_processes: int) -> None:
        self.settings = settings
        self.http_processes = http_processes  # the same for the API, the baseline and bare apps
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env_of(self.settings, **env))
        self.running.append(proc)
        return proc

    def api(self) -> subprocess.Popen[bytes]:
        proc = self.start("-m", "api", API_WORKERS=str(self.http_processes))
        wait_http(f"http://127.0.0.1:{self.settings.api_port}/readyz")
        return proc

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        return self.start("-m", "worker", WORKER_ID=name)

    def uvicorn(self, app: str, port: int) -> subprocess.Popen[bytes]:
        proc = self.start(
            "-m",
            "uvicorn",
            app,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--workers",
            str(self.http_processes),
        )
        wait_http(f"http://127.0.0.1:{port}/docs")
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.running):
            self.stop(proc)


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


def peak_rss_mb(proc: subprocess.Popen[bytes]) -> float:
    """VmHWM, the peak resident set so far, of the process or of the largest of its children
    (uvicorn with several workers is a supervisor and its worker processes)."""
    pids = [proc.pid]
    for children in Path(f"/proc/{proc.pid}/task").glob("*/children"):
        pids += [int(pid) for pid in children.read_text().split()]
    peaks = [0.0]
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        if not status.exists():
            continue
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


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
        await broker.declare_topology(channel, self.topology)
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
    ) -> None:
        """Queue `count` purchases spread over `event_ids`, in the API's message format: one per
        message (the worst case for the worker), or `per_message` of one event per message (as
        the API coalesces concurrent purchases of a partition under a flood)."""
        connection = await aio_pika.connect(self.settings.rabbitmq_url)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.topology.exchange)
        now = datetime.now(UTC)

        async def publish(i: int) -> None:
            event_id = event_ids[i % len(event_ids)]
            partition = self.topology.partition_of(event_id)
            purchases = [
                PurchaseRequested(
                    purchase_id=uuid.uuid4(),
                    event_id=event_id,
                    customer_id=f"c{i}-{n}",
                    quantity=1,
                    accepted_at=now,
                )
                for n in range(per_message)
            ]
            await exchange.publish(
                amqp_message(PurchaseMessage(partition=partition, purchases=purchases)),
                routing_key=self.topology.routing_key(partition),
            )

        messages = count // per_message
        for start in range(0, messages, 2000):
            await asyncio.gather(*(publish(i) for i in range(start, min(start + 2000, messages))))
        await connection.close()

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
        row = await self.db.fetchrow(
            """
            SELECT coalesce(sum(e.total_tickets), 0) AS total,
                   coalesce(sum(e.available_tickets), 0) AS available,
                   (SELECT coalesce(sum(quantity), 0) FROM purchases WHERE status = 'confirmed')
                       AS confirmed,
                   (SELECT count(*) FROM purchases WHERE status = 'rejected') AS rejected,
                   (SELECT count(*) - count(DISTINCT id) FROM purchases) AS duplicated,
                   (SELECT count(*) FROM events WHERE available_tickets < 0) AS negative
            FROM events e
            """
        )
        assert row is not None  # an aggregate always returns a row
        figures = {key: int(value) for key, value in row.items()}
        figures["oversold"] = max(0, figures["confirmed"] - figures["total"])
        if figures["confirmed"] + figures["available"] != figures["total"] or figures["negative"]:
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
        procs = [self.procs.worker(f"bench-{i}") for i in range(workers)]
        try:
            seconds = await self.wait_final(self.sizes.drain)
            rss = max(peak_rss_mb(p) for p in procs)
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
        await self.reset()
        (event_id,) = await self.create_events(1, 1_000_000)
        api = self.procs.api()
        try:
            real = await run_load(
                f"http://127.0.0.1:{self.settings.api_port}",
                purchase_request(event_id),
                duration_s=self.sizes.accept_s,
                concurrency=64,
            )
            api_rss = peak_rss_mb(api)
        finally:
            self.procs.stop(api)
        bare_proc = self.procs.uvicorn("bench.bare_app:app", 8803)
        try:
            bare = await run_load(
                "http://127.0.0.1:8803",
                purchase_request(event_id),
                duration_s=self.sizes.accept_s,
                concurrency=64,
            )
        finally:
            self.procs.stop(bare_proc)
        self.figures["api_accept"] = {
            **load_figures(real),
            "api_peak_rss_mb": api_rss,
            "ratio_to_bare": real.rate / bare.rate if bare.rate else 0.0,
        }
        self.figures["bare_accept"] = load_figures(bare)
        await self.reset()

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

    async def flash_sale(self) -> None:
        await self.reset()
        (event_id,) = await self.create_events(1, self.sizes.flash_tickets)
        api = self.procs.api()
        worker = self.procs.worker("bench-flash")
        try:
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
            api_rss, worker_rss = peak_rss_mb(api), peak_rss_mb(worker)
            coalesced = publish_batch_average(self.settings.api_port)
        finally:
            self.procs.stop(worker)
            self.procs.stop(api)
        check = await self.check_no_oversell()
        self.figures["flash_sale"] = {
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
            **check,
        }


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


def purchase_request(event_id: uuid.UUID) -> Callable[[int], tuple[str, str, bytes]]:
    path = f"/events/{event_id}/tickets/purchase"

    def make(i: int) -> tuple[str, str, bytes]:
        return "POST", path, orjson.dumps({"customer_id": f"customer-{i}", "quantity": 1})

    return make


def load_figures(load: LoadResult) -> dict[str, Any]:
    return {
        "requests_per_s": load.rate,
        "requests": load.requests,
        "p50_ms": load.percentile(0.5) * 1000,
        "p99_ms": load.percentile(0.99) * 1000,
        "statuses": dict(load.statuses),
        "loadgen_cpu_share": load.cpu_share,
    }


def report(figures: dict[str, dict[str, Any]], sizes: Sizes, quick: bool) -> dict[str, Any]:
    base = figures["baseline"]["purchases_per_s"]
    ratios = {
        "hot_drain_vs_baseline": figures["hot_drain_1w"]["purchases_per_s"] / base,
        "hot_drain_coalesced_vs_baseline": figures[f"hot_drain_1w_{COALESCED}_per_message"][
            "purchases_per_s"
        ]
        / base,
        "api_accept_vs_bare": figures["api_accept"]["ratio_to_bare"],
        "flash_sale_vs_baseline": figures["flash_sale"]["purchases_per_s"] / base,
    }
    targets = {
        "hot_drain_vs_baseline >= 10 (1 purchase/message)": ratios["hot_drain_vs_baseline"] >= 10,
        f"hot_drain_vs_baseline >= 10 ({COALESCED} purchases/message)": ratios[
            "hot_drain_coalesced_vs_baseline"
        ]
        >= 10,
        "api_accept_vs_bare >= 0.6": ratios["api_accept_vs_bare"] >= 0.6,
        "api_accept p99 < 50 ms": figures["api_accept"]["p99_ms"] < 50,
        "flash_sale_vs_baseline >= 3": ratios["flash_sale_vs_baseline"] >= 3,
        "zero oversell": all(f.get("oversold", 0) == 0 for f in figures.values()),
        "api RSS < 150 MB": peak_of(figures, "api_peak_rss_mb") < 150,
        "worker RSS < 150 MB": peak_of(figures, "worker_peak_rss_mb") < 150,
    }
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "mode": "quick" if quick else "full",
        "sizes": asdict(sizes),
        "figures": figures,
        "ratios": ratios,
        "targets_met": targets,
    }


def peak_of(figures: dict[str, dict[str, Any]], key: str) -> float:
    """The highest of a figure over every scenario that measured it (a process's peak RSS
    depends on the load: the accept run holds more requests in flight than the flash sale)."""
    return max(float(f[key]) for f in figures.values() if key in f)


def requests_row(label: str, figures: dict[str, Any]) -> tuple[str, float, str, str]:
    """A table row for an HTTP load: its rate and latencies."""
    latency = f"p50 {figures['p50_ms']:.1f} / p99 {figures['p99_ms']:.1f} ms"
    return label, figures["requests_per_s"], "req/s", latency


def print_table(result: dict[str, Any]) -> None:
    f = result["figures"]
    rows = [
        (
            "baseline (1 request = 1 transaction)",
            f["baseline"]["purchases_per_s"],
            "purchases/s",
            f"p99 {f['baseline']['p99_ms']:.0f} ms",
        ),
        (
            "hot-event drain, 1 worker",
            f["hot_drain_1w"]["purchases_per_s"],
            "purchases/s",
            f"{f['hot_drain_1w']['purchases']} queued",
        ),
        (
            "hot-event drain, 2 workers",
            f["hot_drain_2w"]["purchases_per_s"],
            "purchases/s",
            "one event = one partition",
        ),
        (
            f"hot-event drain, 1 worker, {COALESCED}/message",
            f[f"hot_drain_1w_{COALESCED}_per_message"]["purchases_per_s"],
            "purchases/s",
            "as the API packs a flood",
        ),
        (
            "many events, 1 worker",
            f["many_events_1w"]["purchases_per_s"],
            "purchases/s",
            f"{f['many_events_1w']['events']} events",
        ),
        ("many events, 2 workers", f["many_events_2w"]["purchases_per_s"], "purchases/s", ""),
        requests_row("API accept (202 after confirm), 64 conn", f["api_accept"]),
        requests_row("bare validate-and-202, 64 conn", f["bare_accept"]),
        requests_row("status polls (GET /purchases/{id}), 64 conn", f["status_polls"]),
        (
            "flash sale end to end, 256 clients",
            f["flash_sale"]["purchases_per_s"],
            "purchases/s",
            f"{f['flash_sale']['seconds_until_all_final']:.1f} s until all final",
        ),
    ]
    print(
        f"\nBenchmark ({result['mode']}) {result['date']} on {result['machine']};"
        f" {result['http_processes']} process(es) per HTTP app"
    )
    print(f"{'scenario':<42} {'rate':>10}  {'unit':<12} note")
    for name, rate, unit, note in rows:
        print(f"{name:<42} {rate:>10,.0f}  {unit:<12} {note}")
    fs = f["flash_sale"]
    print(
        f"\nflash sale: {fs['accepted_202']} accepted, {fs['fast_rejected_409']} fast-rejected (409),"
        f" {fs['unavailable_503']} 503; confirmed {fs['confirmed']} of {fs['total']} tickets,"
        f" {fs['rejected']} rejected, available {fs['available']}, oversold {fs['oversold']},"
        f" duplicated {fs['duplicated']}; the API packed"
        f" {fs['publish_purchases_per_message']:.1f} purchases per message"
    )
    print(
        f"peak RSS over all scenarios: API {peak_of(f, 'api_peak_rss_mb'):.0f} MB,"
        f" worker {peak_of(f, 'worker_peak_rss_mb'):.0f} MB;"
        f" load generator CPU: {f['api_accept']['loadgen_cpu_share']:.0%} of a core (accept),"
        f" {fs['loadgen_cpu_share']:.0%} (flash sale)"
    )
    print("\nratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items()))
    for target, met in result["targets_met"].items():
        print(f"  [{'x' if met else ' '}] {target}")


def draw_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = result["figures"]
    labels = [
        "baseline\n(sync)",
        "hot drain\n1 worker",
        "hot drain\n2 workers",
        f"hot drain\n{COALESCED}/message",
        "many events\n1 worker",
        "many events\n2 workers",
        "flash sale\nend to end",
    ]
    values = [
        f["baseline"]["purchases_per_s"],
        f["hot_drain_1w"]["purchases_per_s"],
        f["hot_drain_2w"]["purchases_per_s"],
        f[f"hot_drain_1w_{COALESCED}_per_message"]["purchases_per_s"],
        f["many_events_1w"]["purchases_per_s"],
        f["many_events_2w"]["purchases_per_s"],
        f["flash_sale"]["purchases_per_s"],
    ]
    colors = ["#999999"] + ["#1f77b4"] * (len(values) - 1)
    fig, ax = plt.subplots(figsize=(10, 5))
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values])
    ax.set_ylabel("purchases / s")
    ax.set_title(
        f"Purchases per second ({result['mode']}, {result['date'][:10]}, {result['machine']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        default=int(os.environ.get("BENCH_HTTP_PROCESSES", "2")),
        help="uvicorn processes for every HTTP app measured (API, baseline, bare): one per core",
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
