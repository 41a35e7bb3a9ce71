"""Prometheus metrics of the API, served on /metrics."""

import contextlib
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class RequestStats(Collector):
    """`ticketing_http_requests_total` and `ticketing_http_request_duration_seconds`, kept as
    plain numbers and turned into Prometheus samples when scraped.

    Recording a request is a few dict and list operations on the event loop's thread, where
    prometheus_client's Counter and Histogram take a lock per increment and walk the buckets in
    Python: at thousands of requests a second on one core, that was a tenth of a request's CPU.
    Everything that records or scrapes runs on the loop's one thread, so nothing interleaves."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._bounds = buckets
        # (method, route, status) -> a count per bucket (the last one past every bound), then the
        # sum: one entry per kind of answer, so recording one is a single lookup; the counter and
        # the per-route histogram are added up from them when scraped.
        self._answers: dict[tuple[str, str, int], list[float]] = {}

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count and time one answered request, by route template (never the raw path: ids
        would explode the label set)."""
        answer = (method, route, status)
        counts = self._answers.get(answer)
        if counts is None:
            counts = self._answers[answer] = [0.0] * (len(self._bounds) + 2)
        counts[bisect_left(self._bounds, seconds)] += 1
        counts[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "ticketing_http_requests",
            "HTTP requests answered",
            labels=["method", "route", "status"],
        )
        by_route: dict[tuple[str, str], list[float]] = {}
        for (method, route, status), counts in self._answers.items():
            requests.add_metric([method, route, str(status)], sum(counts[:-1]))
            merged = by_route.setdefault((method, route), [0.0] * len(counts))
            for i, value in enumerate(counts):
                merged[i] += value
        yield requests
        latency = HistogramMetricFamily(
            "ticketing_http_request_duration_seconds",
            "Time to answer an HTTP request",
            labels=["method", "route"],
        )
        for (method, route), counts in by_route.items():
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, in_bucket in zip((*self._bounds, float("inf")), counts[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((_le(bound), cumulative))
            latency.add_metric([method, route], buckets, sum_value=counts[-1])
        yield latency


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client writes it (`0.005`, `1.0`, `+Inf`)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


STATS = RequestStats()
REGISTRY.register(STATS)
record = STATS.record

STATUS_WAITERS = Gauge(
    "ticketing_status_waiters",
    "Status requests (long-polls, event streams) waiting on this process's listener; past "
    "STATUS_MAX_WAITERS no more wait: long-polls are answered at once, streams poll",
)


@contextlib.contextmanager
def counting_status_waiters(held: Callable[[], int]) -> Iterator[None]:
    """Report `held()` as the gauge while the app runs (read when scraped, not kept up)."""
    STATUS_WAITERS.set_function(held)
    try:
        yield
    finally:
        STATUS_WAITERS.set_function(lambda: 0)


class RequestMetrics:
    """Counts and times every request the routes answer (the raw-ASGI dispatch records its own
    with `record`), by the template of the route of `routers` the request's path names."""

    def __init__(self, app: ASGIApp, *, routers: Sequence[APIRouter]) -> None:
        self.app = app
        self.routers = routers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = route.path if route is not None else self._template_of(scope)
            record(scope["method"], template, status, time.perf_counter() - started)

    def _template_of(self, scope: Scope) -> str:
        """The route template of a request answered before a route was chosen (a 413 or a 415
        of the request guard, a 405 of the router); `unmatched` for a path no route has."""
        fallback = "unmatched"
        # The app's own routes (the OpenAPI document, the docs), then the routers'.
        app_router = getattr(scope.get("app"), "router", None)
        for routes in (getattr(app_router, "routes", ()), *(r.routes for r in self.routers)):
            for route in routes:
                if not hasattr(route, "path"):  # an included router: its routes come next
                    continue
                # A scope of its own for each question: matching may leave notes in it.
                probe = {key: scope.get(key, "") for key in ("type", "method", "path", "root_path")}
                match, _ = route.matches(probe)
                if match is Match.FULL:
                    return str(route.path)
                if match is Match.PARTIAL and fallback == "unmatched":  # another method's
                    fallback = str(route.path)
        return fallback
