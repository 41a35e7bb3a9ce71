"""Event DTOs: what clients send and what they get back."""

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from shared.text import (
    Description,
    HoldSeconds,
    Instant,
    MaxTicketsPerCustomer,
    MaxTicketsPerPurchase,
    Name,
    TotalTickets,
    Venue,
)

_EVENT_EXAMPLE: dict[str, Any] = {
    "name": "Rammstein — Olympiastadion",
    "starts_at": "2027-06-12T19:30:00+02:00",
    "total_tickets": 20000,
    "venue": "Olympiastadion, Berlin",
    "description": "Stadium tour 2027.",
    "max_tickets_per_purchase": 4,
    "sales_start_at": "2027-01-15T10:00:00+01:00",
    "sales_end_at": "2027-06-12T18:00:00+02:00",
    "max_tickets_per_customer": 6,
    "hold_seconds": 600,
}

SALES_START = "When sales open (ISO 8601 with a UTC offset); null: already open."
SALES_END = "When sales close (ISO 8601 with a UTC offset); null: open until sold out."
PER_CUSTOMER = (
    "Most tickets one customer_id may hold and have confirmed for this event, across all of "
    "their purchases; null: no limit."
)
HOLD = (
    "Seconds a purchase's tickets are held while the buyer pays (then confirm it, or it "
    "expires and the tickets go back on sale); null: purchases are confirmed at once."
)


def check_sales_window(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and start >= end:
        raise ValueError("sales_start_at must be before sales_end_at")


class EventCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EVENT_EXAMPLE]})

    name: Name
    starts_at: Instant = Field(description="ISO 8601 with a UTC offset.")
    total_tickets: TotalTickets
    venue: Venue | None = None
    description: Description | None = None
    max_tickets_per_purchase: MaxTicketsPerPurchase = 10
    sales_start_at: Instant | None = Field(default=None, description=SALES_START)
    sales_end_at: Instant | None = Field(default=None, description=SALES_END)
    max_tickets_per_customer: MaxTicketsPerCustomer | None = Field(
        default=None, description=PER_CUSTOMER
    )
    hold_seconds: HoldSeconds | None = Field(default=None, description=HOLD)

    @model_validator(mode="after")
    def _window_in_order(self) -> "EventCreate":
        check_sales_window(self.sales_start_at, self.sales_end_at)
        return self


def _not_documented_as_null(schema: JsonDict) -> None:
    schema.pop("default", None)


def _may_be_left_out() -> Any:
    """A field a PATCH may leave out (then it is None, and not among the fields set) but not set
    to null: the default is neither validated nor documented, so the schema and the validation
    both say "not null". (Any: what the field holds is its type's, once set.)"""
    return Field(default=None, json_schema_extra=_not_documented_as_null)


class EventUpdate(BaseModel):
    """A partial update: only the fields sent change. Lowering total_tickets below what was sold
    is refused (409)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"venue": "Waldbühne, Berlin", "total_tickets": 22000}]},
    )

    # What every event has may be changed, never removed (null); the rest may be.
    name: Name = _may_be_left_out()
    starts_at: Instant = _may_be_left_out()
    total_tickets: TotalTickets = _may_be_left_out()
    venue: Venue | None = None
    description: Description | None = None
    max_tickets_per_purchase: MaxTicketsPerPurchase = _may_be_left_out()
    # null removes the bound, the limit, the hold (a field not sent stays as it is).
    sales_start_at: Instant | None = Field(default=None, description=SALES_START)
    sales_end_at: Instant | None = Field(default=None, description=SALES_END)
    max_tickets_per_customer: MaxTicketsPerCustomer | None = Field(
        default=None, description=PER_CUSTOMER
    )
    hold_seconds: HoldSeconds | None = Field(default=None, description=HOLD)


class Event(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "7d0f3c52-1b7e-4c55-9a43-2f0d1f7f9a10",
                    **_EVENT_EXAMPLE,
                    "available_tickets": 19996,
                    "version": 2,
                    "created_at": "2026-11-26T10:00:00Z",
                    "updated_at": "2026-11-26T10:05:00Z",
                }
            ]
        }
    )

    id: UUID
    name: str
    description: str | None
    venue: str | None
    starts_at: AwareDatetime
    total_tickets: int
    available_tickets: int
    max_tickets_per_purchase: int
    sales_start_at: AwareDatetime | None
    sales_end_at: AwareDatetime | None
    max_tickets_per_customer: int | None
    hold_seconds: int | None
    version: int
    created_at: AwareDatetime
    updated_at: AwareDatetime


class EventPage(BaseModel):
    items: list[Event]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )
