"""Prometheus metrics of the API, served on /metrics."""

import time
from functools import cache

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.metrics import Counter as CounterChild
from prometheus_client.metrics import Histogram as HistogramChild
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "ticketing_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "ticketing_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# A label set's child is looked up once: labels() takes a lock and builds a key on every call,
# a visible cost at thousands of requests a second. The label sets are few (routes x statuses).
@cache
def _requests(method: str, route: str, status: int) -> CounterChild:
    return REQUESTS.labels(method, route, str(status))


@cache
def _latency(method: str, route: str) -> HistogramChild:
    return LATENCY.labels(method, route)


def record(method: str, route: str, status: int, seconds: float) -> None:
    """Count and time one answered request, by route template (never the raw path: ids would
    explode the label set)."""
    _requests(method, route, status).inc()
    _latency(method, route).observe(seconds)


class RequestMetrics:
    """Counts and times every request the routes answer (the raw-ASGI dispatch records its own
    with `record`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            route = getattr(scope.get("route"), "path", "unmatched")
            record(scope["method"], route, status, time.perf_counter() - started)
