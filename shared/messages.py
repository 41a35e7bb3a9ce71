"""The purchase message: the one contract between the API (publisher) and the worker (consumer).

One message carries one or several purchases, all of the same partition, in the order they were
accepted. `version` lets the consumer refuse a layout it does not know instead of misreading it.
"""

from typing import Annotated, Literal
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
        return self.model_dump_json().encode()

    @classmethod
    def from_body(cls, body: bytes) -> "PurchaseMessage":
        return cls.model_validate_json(body)


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
