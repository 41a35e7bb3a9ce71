"""The purchase message: the one contract between the API (publisher) and the worker (consumer).

One message carries one or several purchases, all of the same partition, in the order they were
accepted. `version` lets the consumer refuse a layout it does not know instead of misreading it.

The models define the message and validate it where it is read. `encode_message` writes it, for
every publisher (the API, the replay of dead letters, the benchmark), straight from plain records:
building a model per purchase would cost the accept path more than the rest of the request. A
property test holds the two to each other (reading what `encode_message` wrote gives back what it
was given).
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal, NamedTuple, Protocol
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field

from shared.text import CustomerId, Instant, Quantity

MESSAGE_VERSION = 1
CONTENT_TYPE = "application/json"
MESSAGE_TYPE = "purchase.v1"


class PurchaseRequested(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    purchase_id: UUID
    event_id: UUID
    # The API's own input types: a message the API could not have sent is undecodable.
    customer_id: CustomerId
    quantity: Quantity
    accepted_at: Instant


class PurchaseMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    partition: Annotated[int, Field(ge=0)]
    purchases: Annotated[list[PurchaseRequested], Field(min_length=1)]

    def to_body(self) -> bytes:
        return encode_message(self.partition, self.purchases)

    @classmethod
    def from_body(cls, body: bytes) -> "PurchaseMessage":
        return cls.model_validate_json(body)


class AcceptedPurchase(NamedTuple):
    """A purchase as the API accepted it, on its way into a message (every field validated)."""

    purchase_id: UUID
    event_id: UUID
    customer_id: str
    quantity: int
    accepted_at: datetime


class _Purchase(Protocol):
    @property
    def purchase_id(self) -> UUID: ...
    @property
    def event_id(self) -> UUID: ...
    @property
    def customer_id(self) -> str: ...
    @property
    def quantity(self) -> int: ...
    @property
    def accepted_at(self) -> datetime: ...


def encode_message(partition: int, purchases: Sequence[_Purchase]) -> bytes:
    """The body of the message of `purchases` (AcceptedPurchase or PurchaseRequested)."""
    return orjson.dumps(
        {
            "version": MESSAGE_VERSION,
            "partition": partition,
            "purchases": [
                {
                    "purchase_id": p.purchase_id,
                    "event_id": p.event_id,
                    "customer_id": p.customer_id,
                    "quantity": p.quantity,
                    "accepted_at": p.accepted_at,
                }
                for p in purchases
            ],
        }
    )


def readable_purchase_ids(body: bytes) -> list[UUID]:
    """Purchase ids that can be read from a message that failed to decode, so their status can
    become `failed` instead of staying pending forever."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    items = data.get("purchases") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    ids: list[UUID] = []
    for item in items:
        raw = item.get("purchase_id") if isinstance(item, dict) else None
        if isinstance(raw, str):
            try:
                ids.append(UUID(raw))
            except ValueError:
                continue
    return ids
