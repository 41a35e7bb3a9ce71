"""Flash-sale load test: many customers buy tickets of a few fresh events, then every event is
checked for oversell.

Start the API and a worker (see docs/load-testing.md), then:

    .venv/bin/locust -f bench/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --host http://127.0.0.1:8000 --html bench/results/locust.html

At the start, LOAD_EVENTS fresh events of LOAD_TICKETS tickets each are created, each holding
a purchase's tickets for LOAD_HOLD_SECONDS while its buyer pays. Each simulated customer then
loops: POST /events/{id}/tickets/purchase (random customer, 1..LOAD_MAX_QUANTITY tickets, an
Idempotency-Key), retrying a 503 with the same key after its Retry-After, then polls
GET /purchases/{id}, honouring Retry-After, until it is decided. A customer given a hold then
pays (POST /purchases/{id}/confirm), walks away without paying (LOAD_UNPAID_SHARE: the hold
expires and the tickets go back on sale) or cancels (LOAD_CANCEL_SHARE, half of them after
paying), and polls until the purchase is confirmed, expired or cancelled.

When the test stops, each customer finishes the purchase it is in (a default --stop-timeout),
purchases whose outcome is still unknown are resolved (abandoned holds are waited for until they
expire), and every event is read back: the tickets it sold (total - available) must equal the
tickets confirmed to customers. A mismatch (oversell, or a confirmation that sold nothing)
prints OVERSELL and exits with status 1.

Knobs (environment variables): LOAD_EVENTS (10), LOAD_TICKETS (1000), LOAD_MAX_QUANTITY (2),
LOAD_HOLD_SECONDS (30, the API's minimum; 0 creates events without holds, confirmed at once),
LOAD_UNPAID_SHARE (0.3), LOAD_CANCEL_SHARE (0.1), LOAD_WAIT_S (0.2, think time between
purchases, uniform 0..this), LOAD_PAY_S (1.0, time to pay, uniform 0..this), LOAD_503_RETRIES
(2), LOAD_POLL_TIMEOUT_S (30), LOAD_DRAIN_TIMEOUT_S (120, how long the final check waits for
purchases still pending or held).

In distributed mode (--master / --worker) every worker process creates and checks its own events.
"""

import logging
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from locust import FastHttpUser, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner

# time.sleep is cooperative here: locust monkey-patches the standard library with gevent.

log = logging.getLogger("ticketing.load")

LOAD_EVENTS = int(os.environ.get("LOAD_EVENTS", "10"))
LOAD_TICKETS = int(os.environ.get("LOAD_TICKETS", "1000"))
LOAD_MAX_QUANTITY = int(os.environ.get("LOAD_MAX_QUANTITY", "2"))
LOAD_HOLD_SECONDS = int(os.environ.get("LOAD_HOLD_SECONDS", "30"))
LOAD_UNPAID_SHARE = float(os.environ.get("LOAD_UNPAID_SHARE", "0.3"))
LOAD_CANCEL_SHARE = float(os.environ.get("LOAD_CANCEL_SHARE", "0.1"))
LOAD_WAIT_S = float(os.environ.get("LOAD_WAIT_S", "0.2"))
LOAD_PAY_S = float(os.environ.get("LOAD_PAY_S", "1.0"))
LOAD_503_RETRIES = int(os.environ.get("LOAD_503_RETRIES", "2"))
LOAD_POLL_TIMEOUT_S = float(os.environ.get("LOAD_POLL_TIMEOUT_S", "30"))
LOAD_DRAIN_TIMEOUT_S = float(os.environ.get("LOAD_DRAIN_TIMEOUT_S", "120"))

PURCHASE = "/events/[id]/tickets/purchase"
STATUS = "/purchases/[id]"
CONFIRM = "/purchases/[id]/confirm"
CANCEL = "/purchases/[id]/cancel"
# A customer's purchase is settled in one of these; a held one still waits for its buyer.
FINAL = frozenset({"confirmed", "rejected", "failed", "expired", "cancelled"})
DECIDED = FINAL | {"held"}
HTTP_TIMEOUT_S = 10


@dataclass
class Attempt:
    """One purchase as the customer knows it. The Idempotency-Key makes it safe to send again."""

    event_id: str
    customer_id: str
    quantity: int
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    purchase_id: str | None = None
    # When to first ask about it: the Retry-After of the last 202 (the API's pace, not ours).
    first_poll_s: float = 1.0
    # The statuses that settle it. Once a cancel may be queued, `confirmed` no longer does: a
    # paid purchase reads `confirmed` until the worker applies the cancel.
    settled_by: frozenset[str] = FINAL

    def body(self) -> dict[str, Any]:
        return {"customer_id": self.customer_id, "quantity": self.quantity}

    def headers(self) -> dict[str, str]:
        return {"Idempotency-Key": self.key}


@dataclass
class Ledger:
    """What this process created and was told, for the summary and the oversell check."""

    total_tickets: dict[str, int] = field(default_factory=dict)  # event id -> tickets
    sold_out: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    confirmed_tickets: Counter[str] = field(default_factory=Counter)  # event id -> tickets
    unresolved: dict[str, Attempt] = field(default_factory=dict)  # key -> sent, outcome unknown
    stopping: bool = False
    setup_failed: bool = False  # its events could not be created: the first customer stops it

    def settle(self, attempt: Attempt, purchase: dict[str, Any]) -> None:
        """Record a purchase's final status."""
        self.unresolved.pop(attempt.key, None)
        status, reason = purchase["status"], purchase.get("reason")
        self.counts[status if reason is None else f"{status} ({reason})"] += 1
        if status == "confirmed":
            # The status carries the quantity actually applied.
            self.confirmed_tickets[attempt.event_id] += purchase["quantity"]


ledger = Ledger()


def retry_after_s(headers: Any, default: float = 1.0) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After") or default))
    except ValueError:
        return default


def purchase_latency_ms(purchase: dict[str, Any]) -> float | None:
    """accepted_at (API) to processed_at (worker): time in the queue plus the commit."""
    if not purchase.get("accepted_at") or not purchase.get("processed_at"):
        return None
    accepted = datetime.fromisoformat(purchase["accepted_at"])
    processed = datetime.fromisoformat(purchase["processed_at"])
    return (processed - accepted).total_seconds() * 1000


class Customer(FastHttpUser):
    wait_time = between(0, LOAD_WAIT_S)

    @task
    def buy_and_wait(self) -> None:
        if ledger.setup_failed and self.environment.runner is not None:
            self.environment.runner.quit()  # from a customer: not inside the runner's own start
            return
        if not ledger.total_tickets or ledger.stopping:
            # Stopping: a customer between purchases may still wake up once before it is
            # killed; it must not start a purchase it would abandon half-sent.
            return
        on_sale = [e for e in ledger.total_tickets if e not in ledger.sold_out]
        attempt = Attempt(
            event_id=random.choice(on_sale or list(ledger.total_tickets)),
            customer_id=f"customer-{random.randrange(1_000_000)}",
            quantity=random.randint(1, LOAD_MAX_QUANTITY),
        )
        ledger.unresolved[attempt.key] = attempt
        if not self.purchase(attempt):
            return
        decided = self.wait_until(attempt, DECIDED)
        if decided is None:
            return
        record_latency(self.environment, decided)
        if decided["status"] != "held":
            ledger.settle(attempt, decided)
            return
        self.pay_or_walk_away(attempt)

    def pay_or_walk_away(self, attempt: Attempt) -> None:
        """A held purchase: pay for it, never pay (it expires), or cancel (some after paying)."""
        roll = random.random()
        time.sleep(random.uniform(0, LOAD_PAY_S))
        if roll < LOAD_UNPAID_SHARE:
            ledger.counts["held, never paid"] += 1
            return  # stays unresolved: the final check waits for it to expire
        cancelling = roll < LOAD_UNPAID_SHARE + LOAD_CANCEL_SHARE
        pays = not cancelling or random.random() < 0.5
        if (
            pays
            and self.send(attempt, "confirm", CONFIRM, {"payment_reference": attempt.key}) is None
        ):
            return
        if cancelling:
            attempt.settled_by = FINAL - {"confirmed"}  # the cancel may be queued from now on
            cancel = self.send(attempt, "cancel", CANCEL, None)
            if cancel == 409:  # refused: nothing was queued
                attempt.settled_by = FINAL
            elif cancel is None:  # stays unresolved: the final check finds out
                return
        settled = self.wait_until(attempt, attempt.settled_by)
        if settled is not None:
            ledger.settle(attempt, settled)

    def send(
        self, attempt: Attempt, action: str, name: str, body: dict[str, Any] | None
    ) -> int | None:
        """POST a confirmation or a cancellation, retrying a 503; its answer, 202 or 409 (the
        hold ended first, say: the status tells the outcome), or None if it failed for good."""
        for try_number in range(LOAD_503_RETRIES + 1):
            with self.client.post(
                f"/purchases/{attempt.purchase_id}/{action}",
                json=body,
                name=name,
                catch_response=True,
            ) as response:
                ledger.counts[f"{action} {response.status_code}"] += 1
                if response.status_code in (202, 409):
                    if response.status_code == 202:
                        attempt.first_poll_s = retry_after_s(response.headers)
                    response.success()
                    return int(response.status_code)
                if response.status_code != 503:
                    response.failure(f"unexpected {response.status_code}: {response.text!r:.200}")
                    return None
                response.failure(f"503 {unavailable(response)}")
                pause = retry_after_s(response.headers)
            if try_number < LOAD_503_RETRIES:
                time.sleep(pause)
        return None

    def purchase(self, attempt: Attempt) -> bool:
        """POST the purchase, retrying a 503 with the same key; True once it is accepted."""
        for try_number in range(LOAD_503_RETRIES + 1):
            with self.client.post(
                f"/events/{attempt.event_id}/tickets/purchase",
                json=attempt.body(),
                headers=attempt.headers(),
                name=PURCHASE,
                catch_response=True,
            ) as response:
                if response.status_code == 202:
                    ledger.counts["202 accepted"] += 1
                    attempt.purchase_id = response.json()["purchase_id"]
                    attempt.first_poll_s = retry_after_s(response.headers)
                    response.success()
                    return True
                if response.status_code == 409:
                    # The right answer, and nothing was queued (unless a 503 before was queued).
                    ledger.counts["409 sold out"] += 1
                    ledger.sold_out.add(attempt.event_id)
                    if try_number == 0:
                        ledger.unresolved.pop(attempt.key, None)
                    response.success()
                    return False
                if response.status_code == 503:
                    kind = unavailable(response)
                    ledger.counts[f"503 {kind}"] += 1
                    response.failure(f"503 {kind}")
                    pause = retry_after_s(response.headers)
                else:
                    ledger.counts[f"{response.status_code or 'no response'} other"] += 1
                    response.failure(f"unexpected {response.status_code}: {response.text!r:.200}")
                    return False  # stays unresolved: the final check finds out
            if try_number < LOAD_503_RETRIES:
                time.sleep(pause)
        return False  # still 503: stays unresolved, the final check finds out

    def wait_until(self, attempt: Attempt, statuses: frozenset[str]) -> dict[str, Any] | None:
        """Poll the status URL until the purchase is in one of `statuses` (None: timed out)."""
        deadline = time.monotonic() + LOAD_POLL_TIMEOUT_S
        pause = attempt.first_poll_s
        while time.monotonic() < deadline:
            time.sleep(pause)
            with self.client.get(
                f"/purchases/{attempt.purchase_id}", name=STATUS, catch_response=True
            ) as response:
                if response.status_code != 200:
                    response.failure(f"unexpected {response.status_code}")
                    pause = retry_after_s(response.headers)
                    continue
                purchase: dict[str, Any] = response.json()
                if purchase["status"] in statuses:
                    return purchase
                pause = retry_after_s(response.headers)
        ledger.counts["poll timed out"] += 1
        return None


def unavailable(response: Any) -> str:
    """What a 503 is, from its problem's title: a full queue is backpressure; anything else
    (the broker or the database away, or too slow to confirm under the load) is named so."""
    try:
        title = response.json().get("title")
    except (ValueError, AttributeError):
        title = None
    if title == "Purchase queue full":
        return "backpressure"
    return f"unavailable: {title or 'no problem in the body'}"


def record_latency(environment: Environment, purchase: dict[str, Any]) -> None:
    """Show accepted -> decided in locust's statistics, with percentiles, as its own row."""
    latency = purchase_latency_ms(purchase)
    if latency is not None:
        environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type="WORKER",
            name="accepted -> decided",
            response_time=latency,
            response_length=0,
            exception=None,
            context={},
        )


def _base_url(environment: Environment) -> str:
    host = environment.host or Customer.host
    if not host:
        raise RuntimeError("no --host given")
    return host.rstrip("/")


def _is_master(environment: Environment) -> bool:
    return isinstance(environment.runner, MasterRunner)


@events.init.add_listener  # type: ignore[untyped-decorator]
def finish_purchases_on_stop(environment: Environment, **_: Any) -> None:
    """Unless --stop-timeout says otherwise, a customer stopped by -t (or Ctrl-C) first finishes
    the purchase it is in, so its outcome is known and the oversell check stays exact."""
    if not environment.stop_timeout:
        environment.stop_timeout = LOAD_POLL_TIMEOUT_S + 5


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def create_events(environment: Environment, **_: Any) -> None:
    global ledger
    if _is_master(environment):
        return
    ledger = Ledger()
    base = _base_url(environment)
    run = uuid.uuid4().hex[:8]
    starts_at = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    try:
        with requests.Session() as http:
            for number in range(LOAD_EVENTS):
                response = http.post(
                    f"{base}/events",
                    json={
                        "name": f"load test {run} #{number}",
                        "starts_at": starts_at,
                        "total_tickets": LOAD_TICKETS,
                        "max_tickets_per_purchase": max(LOAD_MAX_QUANTITY, 1),
                        "hold_seconds": LOAD_HOLD_SECONDS or None,
                    },
                    timeout=HTTP_TIMEOUT_S,
                )
                if response.status_code != 201:
                    raise SetupFailed(
                        f"POST /events answered {response.status_code}: {response.text:.500}"
                    )
                ledger.total_tickets[response.json()["id"]] = LOAD_TICKETS
    except (requests.RequestException, SetupFailed) as exc:
        # Without its events the run can buy nothing: stop now, saying why, rather than idle
        # until -t is over and print no summary.
        log.error("load test not started: its events could not be created at %s: %s", base, exc)
        ledger.total_tickets.clear()
        ledger.setup_failed = True
        environment.process_exit_code = 1
        return
    log.info("created %d events of %d tickets (run %s)", LOAD_EVENTS, LOAD_TICKETS, run)


class SetupFailed(Exception):
    """The API refused to create the run's events (a knob out of its range, say)."""


def resolve_unresolved(http: requests.Session, base: str) -> None:
    """Find out what became of purchases whose customer stopped before knowing: send the ones
    never answered again with the same key (same purchase id, never bought twice), then poll."""
    for attempt in list(ledger.unresolved.values()):
        if attempt.purchase_id is None:
            response = http.post(
                f"{base}/events/{attempt.event_id}/tickets/purchase",
                json=attempt.body(),
                headers=attempt.headers(),
                timeout=HTTP_TIMEOUT_S,
            )
            ledger.counts[f"{response.status_code} at the final check"] += 1
            if response.status_code == 202:
                attempt.purchase_id = response.json()["purchase_id"]
    deadline = time.monotonic() + LOAD_DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        waiting = [a for a in ledger.unresolved.values() if a.purchase_id is not None]
        if not waiting:
            return
        for attempt in waiting:
            response = http.get(f"{base}/purchases/{attempt.purchase_id}", timeout=HTTP_TIMEOUT_S)
            if response.status_code == 200 and response.json()["status"] in attempt.settled_by:
                ledger.settle(attempt, response.json())
        time.sleep(1.0)


def check_oversell(http: requests.Session, base: str) -> list[str]:
    """One line per event; lines starting with OVERSELL are violations."""
    uncertain: Counter[str] = Counter()
    for attempt in ledger.unresolved.values():
        uncertain[attempt.event_id] += attempt.quantity
    lines = []
    for event_id, total in ledger.total_tickets.items():
        event = http.get(f"{base}/events/{event_id}", timeout=HTTP_TIMEOUT_S).json()
        sold = event["total_tickets"] - event["available_tickets"]
        confirmed = ledger.confirmed_tickets[event_id]
        unknown = uncertain[event_id]
        # Exact when every outcome is known; otherwise an unknown purchase may or may not count.
        ok = event["available_tickets"] >= 0 and confirmed <= sold <= confirmed + unknown
        verdict = "ok" if ok else "OVERSELL"
        lines.append(
            f"{verdict:8} event {event_id}: total {total}, sold {sold}, "
            f"confirmed to customers {confirmed}, outcome unknown {unknown}"
        )
    return lines


@events.test_stopping.add_listener  # type: ignore[untyped-decorator]
def stop_buying(environment: Environment, **_: Any) -> None:
    ledger.stopping = True


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def verify(environment: Environment, **_: Any) -> None:
    if _is_master(environment) or not ledger.total_tickets:
        return
    base = _base_url(environment)
    with requests.Session() as http:
        resolve_unresolved(http, base)
        lines = check_oversell(http, base)
    bad = [line for line in lines if line.startswith("OVERSELL")]
    counts = ledger.counts
    print("\n=== ticketing load test summary ===")
    unavailable_503s = sum(n for name, n in counts.items() if name.startswith("503 unavailable: "))
    print(
        f"{PURCHASE}: {counts['202 accepted']} accepted (202), {counts['409 sold out']} sold out "
        f"(409), {counts['503 backpressure']} backpressure (503)"
        + (f", {unavailable_503s} other 503 (see all outcomes)" if unavailable_503s else "")
    )
    print("all outcomes: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    print(
        f"tickets confirmed: {sum(ledger.confirmed_tickets.values())} of "
        f"{sum(ledger.total_tickets.values())} on sale; "
        f"purchases with unknown outcome: {len(ledger.unresolved)}"
    )
    print("\n".join(lines))
    if bad:
        print(f"OVERSELL CHECK FAILED on {len(bad)} of {len(lines)} events")
        environment.process_exit_code = 1
    else:
        exact = "exactly" if not ledger.unresolved else "within the unknown outcomes"
        print(f"oversell check passed: every event sold {exact} the tickets confirmed")
