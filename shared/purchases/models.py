"""Purchase DTOs."""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.messages import PurchaseRequested
from shared.text import CustomerId, PaymentReference, Quantity


class PurchaseStatus(StrEnum):
    PENDING = "pending"  # accepted, not decided yet (no row)
    HELD = "held"  # tickets held until hold_expires_at, waiting for the confirmation
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    EXPIRED = "expired"  # a hold that was not confirmed in time: its tickets went back on sale
    CANCELLED = "cancelled"  # held or confirmed, then cancelled: its tickets went back on sale
    FAILED = "failed"


# Statuses that hold tickets of the event.
HOLDING = frozenset({PurchaseStatus.HELD, PurchaseStatus.CONFIRMED})


class RejectReason(StrEnum):
    SOLD_OUT = "sold_out"
    INSUFFICIENT_TICKETS = "insufficient_tickets"
    EVENT_NOT_FOUND = "event_not_found"
    CUSTOMER_LIMIT = "customer_limit"
    # More tickets than the event's max_tickets_per_purchase allowed when decided: lowered after
    # the API checked it (its event cache may be a moment stale).
    PURCHASE_LIMIT = "purchase_limit"
    SALES_NOT_OPEN = "sales_not_open"
    SALES_CLOSED = "sales_closed"


class ExpireReason(StrEnum):
    HOLD_EXPIRED = "hold_expired"


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
    reason: RejectReason | ExpireReason | None = None
    hold_expires_at: datetime | None = None
    confirmed_at: datetime | None = None
    cancelled_at: datetime | None = None
    payment_reference: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A recorded purchase moving on: held to confirmed or expired, held or confirmed to
    cancelled. Written only if the row is still in `before` (the optimistic check)."""

    purchase_id: UUID
    event_id: UUID
    before: PurchaseStatus
    after: PurchaseStatus
    reason: ExpireReason | None = None
    confirmed_at: datetime | None = None
    cancelled_at: datetime | None = None
    payment_reference: str | None = None


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


class QueuePosition(BaseModel):
    """The wait ahead of a pending purchase (README, "The wait ahead")."""

    ahead_s: float = Field(
        description="Accepted time of its partition still undecided ahead of it: its "
        "accepted_at minus the partition's decided horizon, in seconds."
    )
    estimated_wait_s: float | None = Field(
        description="ahead_s over how fast the partition's horizon has been advancing; null "
        "while that is not known."
    )


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
    hold_expires_at: AwareDatetime | None = Field(
        default=None, description="While held: when the hold ends unless confirmed before."
    )
    confirmed_at: AwareDatetime | None = None
    cancelled_at: AwareDatetime | None = None
    payment_reference: str | None = None
    queue: QueuePosition | None = Field(
        default=None,
        description="While pending: the wait ahead, where known (null when nothing is known, "
        "e.g. on a replica that did not accept the purchase).",
    )


class ConfirmRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"payment_reference": "psp-7f3a91"}]}
    )

    payment_reference: PaymentReference


class LifecycleAccepted(BaseModel):
    """A confirmation or cancellation, queued: the status URL tells when it is applied."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "purchase_id": "3f1c2a9e-5b4d-8e21-a6c4-9d1f0b7e3a55",
                    "action": "confirm",
                    "status_url": "/purchases/3f1c2a9e-5b4d-8e21-a6c4-9d1f0b7e3a55",
                }
            ]
        }
    )

    purchase_id: UUID
    action: Literal["confirm", "cancel"]
    status_url: str
