"""Event DTOs: what clients send and what they get back."""

from typing import Any
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.text import Description, Instant, MaxTicketsPerPurchase, Name, TotalTickets, Venue

_EVENT_EXAMPLE: dict[str, Any] = {
    "name": "Rammstein — Olympiastadion",
    "starts_at": "2027-06-12T19:30:00+02:00",
    "total_tickets": 20000,
    "venue": "Olympiastadion, Berlin",
    "description": "Stadium tour 2027.",
    "max_tickets_per_purchase": 4,
}


class EventCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EVENT_EXAMPLE]})

    name: Name
    starts_at: Instant = Field(description="ISO 8601 with a UTC offset.")
    total_tickets: TotalTickets
    venue: Venue | None = None
    description: Description | None = None
    max_tickets_per_purchase: MaxTicketsPerPurchase = 10


class EventUpdate(BaseModel):
    """A partial update: only the fields sent change. Lowering total_tickets below what was sold
    is refused (409)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"venue": "Waldbühne, Berlin", "total_tickets": 22000}]},
    )

    name: Name | None = None
    starts_at: Instant | None = None
    total_tickets: TotalTickets | None = None
    venue: Venue | None = None
    description: Description | None = None
    max_tickets_per_purchase: MaxTicketsPerPurchase | None = None


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
    version: int
    created_at: AwareDatetime
    updated_at: AwareDatetime


class EventPage(BaseModel):
    items: list[Event]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )
