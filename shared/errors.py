"""Domain errors. They carry no HTTP; api/errors.py maps each to a problem+json response."""


class DomainError(Exception):
    """Base of every error the services raise on purpose."""

    title = "Request failed"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    title = "Not found"


class EventNotFound(NotFound):
    title = "Event not found"

    def __init__(self, event_id: object) -> None:
        super().__init__(f"No event with id {event_id}.")


class PurchaseNotFound(NotFound):
    title = "Purchase not found"

    def __init__(self, purchase_id: object) -> None:
        super().__init__(f"No purchase with id {purchase_id} was ever issued.")


class Conflict(DomainError):
    title = "Conflict"


class SoldOut(Conflict):
    title = "Sold out"

    def __init__(self, event_id: object) -> None:
        super().__init__(f"Event {event_id} has no tickets left.")


class SalesNotOpen(Conflict):
    title = "Sales not open"

    def __init__(self, event_id: object, opens: object) -> None:
        super().__init__(f"Sales for event {event_id} open at {opens}.")


class SalesClosed(Conflict):
    title = "Sales closed"

    def __init__(self, event_id: object, closed: object) -> None:
        super().__init__(f"Sales for event {event_id} closed at {closed}.")


class NotConfirmable(Conflict):
    title = "Purchase cannot be confirmed"


class NotCancellable(Conflict):
    title = "Purchase cannot be cancelled"


class VersionMismatch(Conflict):
    title = "Version mismatch"


class EventHasPurchases(Conflict):
    title = "Event has purchases"


class InvalidRequest(DomainError):
    """A request that is well-formed JSON but breaks a rule that needs stored state to check.
    `location` says which input, as validation errors locate theirs (`("body", "quantity")`),
    so that a client can show the error beside it."""

    title = "Invalid request"

    def __init__(self, detail: str, *, location: tuple[str, ...]) -> None:
        super().__init__(detail)
        self.location = location


class IdempotencyKeyReused(InvalidRequest):
    title = "Idempotency-Key reused with a different request"


class ServiceUnavailable(DomainError):
    """A dependency (broker, database) cannot take the request now; the client should retry."""

    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class QueueFull(ServiceUnavailable):
    title = "Purchase queue full"


class BrokerUnavailable(ServiceUnavailable):
    title = "Message broker unavailable"


class StartupError(RuntimeError):
    """What stops a process from starting (a service down, a schema not migrated, settings that
    disagree), said in one line with what to do about it. The entry points print it and exit
    non-zero, never with a traceback. Not a DomainError: no request ever sees it."""
