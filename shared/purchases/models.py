"""Purchase DTOs."""

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict

from shared.messages import PurchaseRequested
from shared.text import CustomerId, Quantity


class PurchaseStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    FAILED = "failed"


class RejectReason(StrEnum):
    SOLD_OUT = "sold_out"
    INSUFFICIENT_TICKETS = "insufficient_tickets"
    EVENT_NOT_FOUND = "event_not_found"


class FailReason(StrEnum):
    UNDECODABLE_MESSAGE = "undecodable_message"
    DELIVERY_LIMIT_EXCEEDED = "delivery_limit_exceeded"
    DEAD_LETTERED = "dead_lettered"
    WRONG_PARTITION = "wrong_partition"
    RECORD_CONFLICT = "record_conflict"


@dataclass(frozen=True, slots=True)
class Decision:
    """What a worker decided for one purchase: the row it records."""

    purchase: PurchaseRequested
    status: PurchaseStatus
    reason: RejectReason | None = None


class PurchaseCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"customer_id": "customer-42", "quantity": 2}]},
    )

    customer_id: CustomerId
    quantity: Quantity


class PurchaseAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "purchase_id": "3f1c2a9e-5b4d-8e21-a6c4-9d1f0b7e3a55",
                    "event_id": "7d0f3c52-1b7e-4c55-9a43-2f0d1f7f9a10",
                    "customer_id": "customer-42",
                    "quantity": 2,
                    "status": "pending",
                    "status_url": "/purchases/3f1c2a9e-5b4d-8e21-a6c4-9d1f0b7e3a55",
                }
            ]
        }
    )

    purchase_id: UUID
    event_id: UUID
    customer_id: str
    quantity: int
    status: Literal[PurchaseStatus.PENDING] = PurchaseStatus.PENDING
    status_url: str


class Purchase(BaseModel):
    """A purchase's state. While it is pending, event_id, customer_id, quantity and accepted_at
    are known only to the API replica that accepted it; another replica answers null for them."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "purchase_id": "3f1c2a9e-5b4d-8e21-a6c4-9d1f0b7e3a55",
                    "event_id": "7d0f3c52-1b7e-4c55-9a43-2f0d1f7f9a10",
                    "customer_id": "customer-42",
                    "quantity": 2,
                    "status": "confirmed",
                    "reason": None,
                    "accepted_at": "2026-11-26T10:00:00.120Z",
                    "processed_at": "2026-11-26T10:00:00.180Z",
                }
            ]
        }
    )

    purchase_id: UUID
    event_id: UUID | None
    customer_id: str | None
    quantity: int | None
    status: PurchaseStatus
    reason: str | None = None
    accepted_at: AwareDatetime | None
    processed_at: AwareDatetime | None = None
