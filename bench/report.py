"""What a benchmark run prints and writes: the ratios against the targets, a table, a chart."""

import json
import os
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.sizes import COALESCED, SPREAD_CONNECTIONS, SPREAD_EVENTS, Sizes

RESULTS = Path(__file__).resolve().parent / "results"
# The flash sale's pipeline CPU per confirmed purchase measured the same way on the code before
# the accept path was reworked (issue 11): the target is at most half of it.
PIPELINE_BEFORE = RESULTS / "pipeline-before.json"


def pipeline_before() -> dict[str, Any] | None:
    if not PIPELINE_BEFORE.exists():
        return None
    reference: dict[str, Any] = json.loads(PIPELINE_BEFORE.read_text())
    return reference


def report(figures: dict[str, dict[str, Any]], sizes: Sizes, quick: bool) -> dict[str, Any]:
    base = figures["baseline"]["purchases_per_s"]
    api, api_256 = figures["api_accept"], figures["api_accept_256"]
    ratios = {
        "hot_drain_vs_baseline": figures["hot_drain_1w"]["purchases_per_s"] / base,
        "hot_drain_coalesced_vs_baseline": figures[f"hot_drain_1w_{COALESCED}_per_message"][
            "purchases_per_s"
        ]
        / base,
        # Medians of ratios of loads measured back to back (bench/run.py, api_accept).
        "api_accept_vs_raw_64": api["vs_raw"],
        "api_accept_vs_raw_256": api_256["vs_raw"],
        "api_cpu_per_request_vs_raw_64": api["cpu_vs_raw"],
        "api_cpu_per_request_vs_raw_256": api_256["cpu_vs_raw"],
        "api_accept_vs_bare": api["accepted_per_s"] / figures["bare_accept"]["accepted_per_s"],
        "flash_sale_vs_baseline": figures["flash_sale"]["purchases_per_s"] / base,
        **{
            f"spread_vs_baseline_{c}": figures[f"spread_{c}"]["confirmed_per_s"]
            / figures[f"spread_baseline_{c}"]["confirmed_per_s"]
            for c in SPREAD_CONNECTIONS
        },
    }
    # A burst of decisions against what the client and the kernel alone take for it (where both
    # answered anything).
    for kind in ("long_poll", "sse"):
        burst = figures[f"waiters_{kind}"]["decision_to_client_p99_ms"]
        floor = figures[f"floor_{kind}"]["decision_to_client_p99_ms"]
        if burst and floor:
            ratios[f"status_burst_p99_vs_floor_{kind}"] = burst / floor
    if "flash_sale_cluster" in figures:
        ratios["flash_sale_cluster_vs_single_node"] = figures["flash_sale_cluster"][
            "vs_single_node"
        ]
    pipeline = figures["flash_sale"]["pipeline_cpu_ms_per_confirmed"]["total"]
    before = pipeline_before()
    if before is not None:
        ratios["pipeline_cpu_vs_before"] = (
            pipeline / before["pipeline_cpu_ms_per_confirmed"]["total"]
        )
    targets = {
        "hot_drain_vs_baseline >= 10 (1 purchase/message)": ratios["hot_drain_vs_baseline"] >= 10,
        f"hot_drain_vs_baseline >= 10 ({COALESCED} purchases/message)": ratios[
            "hot_drain_coalesced_vs_baseline"
        ]
        >= 10,
        "api_accept_vs_raw >= 0.5 at 64 connections": ratios["api_accept_vs_raw_64"] >= 0.5,
        "api_accept_vs_raw >= 0.5 at 256 connections": ratios["api_accept_vs_raw_256"] >= 0.5,
        "api CPU per request <= 2.5x raw's (64 connections)": ratios[
            "api_cpu_per_request_vs_raw_64"
        ]
        <= 2.5,
        "api CPU per request <= 2.5x raw's (256 connections)": ratios[
            "api_cpu_per_request_vs_raw_256"
        ]
        <= 2.5,
        "api_accept p99 < 50 ms at 64 connections": api["p99_ms"] < 50,
        "flash_sale_vs_baseline >= 3": ratios["flash_sale_vs_baseline"] >= 3,
        f"many events: >= 3x the baseline at {SPREAD_CONNECTIONS[1]} connections": ratios[
            f"spread_vs_baseline_{SPREAD_CONNECTIONS[1]}"
        ]
        >= 3,
        f"many events: >= 2x the baseline at {SPREAD_CONNECTIONS[0]} connections": ratios[
            f"spread_vs_baseline_{SPREAD_CONNECTIONS[0]}"
        ]
        >= 2,
        f"many events: p99 < 100 ms at {SPREAD_CONNECTIONS[0]} connections": figures[
            f"spread_{SPREAD_CONNECTIONS[0]}"
        ]["p99_ms"]
        < 100,
        "flash sale with holds: sold out, every ticket confirmed": figures["flash_holds"][
            "tickets_sold"
        ]
        == figures["flash_holds"]["tickets"],
        "status: long-poll <= 1.2 status requests per purchase": figures["status_long_poll"][
            "status_requests_per_purchase"
        ]
        <= 1.2,
        "status: decision to client p99 < 100 ms, long-poll, the waiters decided at a pace": _below(
            figures["waiters_long_poll_paced"]["decision_to_client_p99_ms"], 100
        ),
        "status: decision to client p99 < 100 ms, server-sent events, at a pace": _below(
            figures["waiters_sse_paced"]["decision_to_client_p99_ms"], 100
        ),
        "status: API RSS < 200 MB with the long-polls held": figures["waiters_long_poll"][
            "api_rss_mb_with_waiters"
        ]
        < 200,
        "status: API RSS < 200 MB with the event streams held": figures["waiters_sse"][
            "api_rss_mb_with_waiters"
        ]
        < 200,
        "status: estimated_wait_s within +-50 % for >= 80 % of purchases": figures[
            "wait_estimates"
        ]["share_within_50_percent"]
        >= 0.8,
        "zero oversell": all(f.get("oversold", 0) == 0 for f in figures.values()),
        "api RSS < 150 MB": peak_of(figures, "api_peak_rss_mb") < 150,
        "worker RSS < 150 MB": peak_of(figures, "worker_peak_rss_mb") < 150,
    }
    if "pipeline_cpu_vs_before" in ratios:
        targets["pipeline CPU per confirmed purchase <= half of before"] = (
            ratios["pipeline_cpu_vs_before"] <= 0.5
        )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "mode": "quick" if quick else "full",
        "sizes": asdict(sizes),
        "figures": figures,
        "ratios": ratios,
        "targets_met": targets,
    }


def machine() -> str:
    """Which machine the figures come from: its name, its processor (model, family and model
    numbers, and whether it is a virtual machine) and its Python. The same kind of machine has
    measured several times slower on another day, so a figure is only read with this beside it."""
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            cpu.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    processor = cpu.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in cpu and "model" in cpu:
        processor += f" (family {cpu['cpu family']}, model {cpu['model']})"
    if "hypervisor" in cpu.get("flags", "").split():
        processor += " under a hypervisor"
    return (
        f"{platform.node()} {platform.machine()}, {processor}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def _below(value: float | None, limit: float) -> bool:
    return value is not None and value < limit


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
        requests_row("raw ASGI read-parse-202, 64 conn", f["raw_accept"]),
        requests_row("bare FastAPI validate-and-202, 64 conn", f["bare_accept"]),
        requests_row("API accept, 256 conn", f["api_accept_256"]),
        requests_row("raw ASGI, 256 conn", f["raw_accept_256"]),
        requests_row("status polls (GET /purchases/{id}), 64 conn", f["status_polls"]),
        (
            "flash sale end to end, 256 clients",
            f["flash_sale"]["purchases_per_s"],
            "purchases/s",
            f"{f['flash_sale']['seconds_until_all_final']:.1f} s until all final",
        ),
    ]
    for c in SPREAD_CONNECTIONS:
        for label, key in (("baseline", f"spread_baseline_{c}"), ("this design", f"spread_{c}")):
            spread = f[key]
            rows.append(
                (
                    f"{SPREAD_EVENTS} events at once, {label}, {c} conn",
                    spread["confirmed_per_s"],
                    "confirmed/s",
                    f"p50 {spread['p50_ms']:.0f} / p99 {spread['p99_ms']:.0f} ms, "
                    f"{spread['cpu_ms_per_confirmed']['total']:.2f} ms CPU each",
                )
            )
    print(
        f"\nBenchmark ({result['mode']}) {result['date']} on {result['machine']};"
        f" {result['http_processes']} process(es) per HTTP app"
    )
    print(f"{'scenario':<42} {'rate':>10}  {'unit':<12} note")
    for name, rate, unit, note in rows:
        print(f"{name:<42} {rate:>10,.0f}  {unit:<12} {note}")
    fs = f["flash_sale"]
    cpu_single = fs["pipeline_cpu_ms_per_confirmed"]
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
    if "flash_sale_cluster" in f:
        fc = f["flash_sale_cluster"]
        print(
            f"flash sale on a 3-node RabbitMQ cluster: {fc['purchases_per_s']:,.0f} purchases/s"
            f" ({fc['vs_single_node']:.2f}x the single node's {fs['purchases_per_s']:,.0f}),"
            f" accept p50 {fc['p50_ms']:.1f} / p99 {fc['p99_ms']:.1f} ms; {fc['accepted_202']}"
            f" accepted, confirmed {fc['confirmed']} of {fc['total']} tickets, oversold"
            f" {fc['oversold']}, duplicated {fc['duplicated']}; RabbitMQ CPU per confirmed"
            f" purchase {fc['pipeline_cpu_ms_per_confirmed']['rabbitmq']:.3f} ms"
            f" (single node {cpu_single['rabbitmq']:.3f} ms)"
        )
    fh = f["flash_holds"]
    print(
        f"flash sale with holds ({fh['hold_seconds']} s, a third never paid): sold"
        f" {fh['tickets_sold']} of {fh['tickets']} tickets in {fh['seconds_to_sell_out']:.1f} s"
        f" to {fh['buyers']} buyers at once; {fh['holds_given']} holds given,"
        f" {fh['holds_expired']} expired and resold; oversold {fh['oversold']}"
    )
    sp, sl = f["status_polling"], f["status_long_poll"]
    print(
        f"status until decided ({sp['buyers']} buyers, {sp['purchases']} purchases): polling"
        f" {sp['status_requests_per_purchase']:.2f} requests per purchase, p50"
        f" {sp['accepted_to_decided_p50_ms']:.0f} ms; long-poll"
        f" {sl['status_requests_per_purchase']:.2f}, p50 {sl['accepted_to_decided_p50_ms']:.0f} ms"
    )
    for label, key in (
        ("long-poll, decided at once", "waiters_long_poll"),
        ("long-poll, decided at a pace", "waiters_long_poll_paced"),
        ("server-sent events, decided at once", "waiters_sse"),
        ("server-sent events, decided at a pace", "waiters_sse_paced"),
    ):
        w = f[key]
        print(
            f"{w['waiters']} waiters on one API process ({label}, all decided within"
            f" {w['decided_within_s']:.1f} s): {w['answered']} answered,"
            f" decision to client p50 {w['decision_to_client_p50_ms'] or 0:.0f} /"
            f" p99 {w['decision_to_client_p99_ms'] or 0:.0f} ms,"
            f" API RSS {w['api_rss_mb_with_waiters']:.0f} MB"
        )
    for label, key in (("long-polls", "floor_long_poll"), ("event streams", "floor_sse")):
        w = f[key]
        print(
            f"the answer floor, {w['waiters']} {label} answered in one burst by a server that"
            f" only writes (bench/answer_floor.py): {w['answered']} answered,"
            f" p50 {w['decision_to_client_p50_ms'] or 0:.0f} /"
            f" p99 {w['decision_to_client_p99_ms'] or 0:.0f} ms"
        )
    we = f["wait_estimates"]
    print(
        f"estimated_wait_s at accept: {we['share_within_50_percent']:.0%} of"
        f" {we['probes_with_a_wait']} purchases within +-50 % of the real wait"
    )
    cpu = fs["pipeline_cpu_ms_per_confirmed"]
    print(
        "CPU per accepted request: "
        + ", ".join(
            f"{name} {f[key]['cpu_ms_per_request']:.3f} ms"
            for name, key in (
                ("API", "api_accept"),
                ("raw", "raw_accept"),
                ("bare", "bare_accept"),
                ("API@256", "api_accept_256"),
                ("raw@256", "raw_accept_256"),
            )
        )
    )
    print(
        "flash sale pipeline CPU per confirmed purchase: "
        + ", ".join(f"{name} {value:.3f} ms" for name, value in cpu.items())
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
