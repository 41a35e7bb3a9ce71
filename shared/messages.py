"""The purchase message: the one contract between the API (publisher) and the worker (consumer).

A message carries commands for one partition, in the order the API accepted them: purchases,
and the confirmations and cancellations of purchases already made. Every change to an event's
inventory travels through the event's partition this way, so the partition's one worker applies
them in order (a cancel right after its own purchase is applied after it). `version` lets the
consumer refuse a layout it does not know instead of misreading it: version 1, which carried
purchases only (as `purchases`), is still read, so workers upgraded first keep up with API
replicas that are not yet.

The models define the message and validate it where it is read. `encode_message` writes it, for
every publisher (the API, the replay of dead letters, the benchmark), straight from plain records:
building a model per purchase would cost the accept path more than the rest of the request. A
property test holds the two to each other (reading what `encode_message` wrote gives back what it
was given).
"""

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Literal, NamedTuple, Protocol
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.text import CustomerId, Instant, Quantity, QueuedPaymentReference

MESSAGE_VERSION: Literal[2] = 2
# The API answers 202 to a confirmation or a cancellation of a hold only if the broker queued it
# before the hold's end plus this margin; the partition's worker expires a hold only once the
# commands it applied reach past its end by as much (worker/decision.py), so neither, answered
# 202, finds its hold gone.
CONFIRM_MARGIN = timedelta(seconds=1)
CONTENT_TYPE = "application/json"
MESSAGE_TYPE = "purchase.v2"


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    purchase_id: UUID
    event_id: UUID  # what the partition is chosen by
    accepted_at: Instant  # when the API accepted the command (its clock)


class PurchaseRequested(_Command):
    # The API's own input types: a message the API could not have sent is undecodable.
    kind: Literal["purchase"] = "purchase"
    customer_id: CustomerId
    quantity: Quantity


class ConfirmRequested(_Command):
    kind: Literal["confirm"] = "confirm"
    payment_reference: QueuedPaymentReference


class CancelRequested(_Command):
    kind: Literal["cancel"] = "cancel"


Command = Annotated[
    PurchaseRequested | ConfirmRequested | CancelRequested, Field(discriminator="kind")
]


class PurchaseMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1, 2] = MESSAGE_VERSION
    partition: Annotated[int, Field(ge=0)]
    commands: Annotated[list[Command], Field(min_length=1)]

    @property
    def purchases(self) -> list[PurchaseRequested]:
        return [c for c in self.commands if isinstance(c, PurchaseRequested)]

    @property
    def confirmations(self) -> list[ConfirmRequested]:
        return [c for c in self.commands if isinstance(c, ConfirmRequested)]

    @classmethod
    def from_body(cls, body: bytes) -> "PurchaseMessage":
        """Read a body of either version (ValidationError if it is neither). Validated straight
        from the JSON: a `mode="before"` validator would make pydantic build the whole document
        as Python objects first, a third of the worker's decoding time."""
        try:
            return cls.model_validate_json(body)
        except ValidationError as error:
            try:
                old = _MessageV1.model_validate_json(body)
            except ValidationError:
                raise error from None
        commands: list[Command] = list(old.purchases)
        return cls.model_construct(version=1, partition=old.partition, commands=commands)


class _MessageV1(BaseModel):
    """Version 1: purchases only, listed as `purchases`, each without a kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1]
    partition: Annotated[int, Field(ge=0)]
    purchases: Annotated[list[PurchaseRequested], Field(min_length=1)]


class AcceptedPurchase(NamedTuple):
    """A purchase as the API accepted it, on its way into a message (every field validated)."""

    purchase_id: UUID
    event_id: UUID
    customer_id: str
    quantity: int
    accepted_at: datetime
    kind: str = "purchase"


class AcceptedConfirm(NamedTuple):
    purchase_id: UUID
    event_id: UUID
    payment_reference: str
    accepted_at: datetime
    kind: str = "confirm"


class AcceptedCancel(NamedTuple):
    purchase_id: UUID
    event_id: UUID
    accepted_at: datetime
    kind: str = "cancel"


Accepted = AcceptedPurchase | AcceptedConfirm | AcceptedCancel


class _Encodable(Protocol):
    @property
    def kind(self) -> str: ...


_RECORDS: tuple[type[Accepted], ...] = (AcceptedPurchase, AcceptedConfirm, AcceptedCancel)

# What each kind of command carries, besides its kind, in the order it is written: the fields of
# the API's record of that kind, so the records are the one definition of the message's layout.
_FIELDS: dict[str, tuple[str, ...]] = {
    record._field_defaults["kind"]: tuple(name for name in record._fields if name != "kind")
    for record in _RECORDS
}


def encode_message(partition: int, commands: Sequence[_Encodable]) -> bytes:
    """The body of the message of `commands` (Accepted* records or decoded commands)."""
    return orjson.dumps(
        {
            "version": MESSAGE_VERSION,
            "partition": partition,
            "commands": [_command(c) for c in commands],
        }
    )


# The API's records, whose fields are the message's: found by their exact type, a dict lookup
# per command where an isinstance() check against the union cost more than the dict itself.
_RECORD_FIELDS: dict[type, tuple[str, ...]] = {record: record._fields for record in _RECORDS}


def _command(command: _Encodable) -> dict[str, object]:
    fields = _RECORD_FIELDS.get(type(command))
    if fields is not None:
        return dict(zip(fields, command))  # type: ignore[call-overload]  # noqa: B905 (its own fields)
    # The kind last, as in the records, so a message reads back to the same bytes.
    return {
        **{name: getattr(command, name) for name in _FIELDS[command.kind]},
        "kind": command.kind,
    }


def readable_purchase_ids(body: bytes) -> list[UUID]:
    """Purchase ids that can be read from a message that failed to decode, so their status can
    become `failed` instead of staying pending forever (purchases only: a confirmation or a
    cancellation that cannot be read leaves its purchase as it was)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(data, dict):
        return []
    items = data.get("commands", data.get("purchases"))
    if not isinstance(items, list):
        return []
    ids: list[UUID] = []
    for item in items:
        if not isinstance(item, dict) or item.get("kind", "purchase") != "purchase":
            continue
        raw = item.get("purchase_id")
        if isinstance(raw, str):
            try:
                ids.append(UUID(raw))
            except ValueError:
                continue
    return ids
