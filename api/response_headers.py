"""The headers each answer carries, as the OpenAPI document describes them: a generated client
reads `Location`, `ETag` and `Retry-After` from here, not from prose."""

from typing import Any

_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {
        "description": "Where the resource is read (for a purchase: its status).",
        "schema": {"type": "string", "format": "uri-reference"},
    },
    "ETag": {
        "description": 'The entity tag: an event\'s `"<version>"`, a purchase\'s `"<status>"`.',
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before asking again.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "Cache-Control": {
        "description": "`no-store`: a status answer is never kept.",
        "schema": {"type": "string"},
    },
}


def with_headers(status: int, *names: str) -> dict[int | str, dict[str, Any]]:
    """A route's `responses` entry documenting the headers `names` on its `status` answer."""
    return {status: {"headers": {name: _HEADERS[name] for name in names}}}
