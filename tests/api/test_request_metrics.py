"""The API's request metrics: counted as plain numbers, served as Prometheus counters and
histograms exactly as prometheus_client would write them."""

from prometheus_client import CollectorRegistry, generate_latest

from api.metrics import RequestStats
from tests.metrics import sample


def _scraped(stats: RequestStats) -> str:
    registry = CollectorRegistry()
    registry.register(stats)
    return generate_latest(registry).decode()


def test_requests_are_counted_by_method_route_and_status() -> None:
    stats = RequestStats()
    for status in (202, 202, 409):
        stats.record("POST", "/events/{event_id}/tickets/purchase", status, 0.002)
    stats.record("GET", "/purchases/{purchase_id}", 200, 0.001)

    text = _scraped(stats)

    route = "/events/{event_id}/tickets/purchase"
    name = "ticketing_http_requests_total"
    assert sample(text, name, method="POST", route=route, status="202") == 2
    assert sample(text, name, method="POST", route=route, status="409") == 1
    assert sample(text, name, method="GET", route="/purchases/{purchase_id}", status="200") == 1


def test_latency_buckets_are_cumulative_and_a_bound_holds_what_equals_it() -> None:
    stats = RequestStats(buckets=(0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        stats.record("POST", "/x", 202, seconds)

    text = _scraped(stats)

    name = "ticketing_http_request_duration_seconds"
    assert sample(text, f"{name}_bucket", method="POST", route="/x", le="0.01") == 2
    assert sample(text, f"{name}_bucket", method="POST", route="/x", le="0.1") == 3
    assert sample(text, f"{name}_bucket", method="POST", route="/x", le="+Inf") == 4
    assert sample(text, f"{name}_count", method="POST", route="/x") == 4
    assert abs(sample(text, f"{name}_sum", method="POST", route="/x") - 3.065) < 1e-9
    assert "# TYPE ticketing_http_request_duration_seconds histogram" in text
    assert "# TYPE ticketing_http_requests_total counter" in text


def test_a_routes_latency_adds_up_the_answers_of_every_status() -> None:
    stats = RequestStats(buckets=(0.01,))
    stats.record("POST", "/x", 202, 0.005)
    stats.record("POST", "/x", 409, 0.02)
    stats.record("POST", "/x", 202, 0.03)
    stats.record("GET", "/x", 200, 0.001)

    text = _scraped(stats)

    name = "ticketing_http_request_duration_seconds"
    assert sample(text, f"{name}_bucket", method="POST", route="/x", le="0.01") == 1
    assert sample(text, f"{name}_count", method="POST", route="/x") == 3
    assert abs(sample(text, f"{name}_sum", method="POST", route="/x") - 0.055) < 1e-9
    assert sample(text, f"{name}_count", method="GET", route="/x") == 1
    requests = "ticketing_http_requests_total"
    assert sample(text, requests, method="POST", route="/x", status="202") == 2
    assert sample(text, requests, method="POST", route="/x", status="409") == 1
