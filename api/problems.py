"""RFC 9457 problem details: the one shape, and the one writer, of every error response.

The exception handlers, the request guard (413/415 before routing) and the raw-ASGI dispatch all
answer with `problem(...)`, so a problem reads the same whichever layer refused the request.
"""

import re
from functools import cache
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import BaseModel
from starlette.datastructures import URL
from starlette.responses import Response
from starlette.types import Scope

from api.answers import Answer
from api.response_headers import with_headers

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:ticketing:problem:"
# A path that is already a URI reference to this server: a slash, then no second one, and
# only characters a path may hold as they are (RFC 3986 pchar).
_PLAIN_PATH = re.compile(r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str  # the request's path
    errors: list[dict[str, Any]] | None = None


@cache
def slug(title: str) -> str:
    return "-".join(title.lower().replace("-", " ").split())


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    instance: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    type_: str | None = None,
) -> Answer:
    # A Problem (the documented model), written straight from its fields: in a flash sale
    # most answers are the 409 of a sold-out event. A test reads it back through the model.
    body: dict[str, Any] = {
        "type": type_ or PROBLEM_TYPE_BASE + slug(title),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": as_reference(instance),
    }
    if errors is not None:
        body["errors"] = errors
    return Answer(
        status, orjson.dumps(body), media_type=PROBLEM_JSON, headers=tuple((headers or {}).items())
    )


def as_reference(path: str) -> str:
    """A request's path (as ASGI gives it, decoded) as the URI reference `instance` must be:
    percent-encoded where it holds what a path may not, and never starting with `//`, which a
    client resolves as another host (`//evil.example/x`)."""
    if _PLAIN_PATH.fullmatch(path):
        return path
    encoded = quote(path, safe="/!$&'()*+,;=:@-._~")
    return "/%2F" + encoded[2:] if encoded.startswith("//") else encoded


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    instance: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    type_: str | None = None,
) -> Response:
    """`problem(...)` as a Starlette response, for exception handlers and routes."""
    return problem(
        status, title, detail, instance=instance, errors=errors, headers=headers, type_=type_
    ).response()


def instance_of(scope: Scope) -> str:
    """A problem's `instance` where only the ASGI scope is at hand (the request guard): the
    request's path, as the exception handlers name it (Starlette's `request.url.path`)."""
    return URL(scope=scope).path


# For the OpenAPI document: every route may answer with a problem.
def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": "Problem details"}
        for status in statuses
    }
    if 503 in responses:  # every 503 says when to retry
        responses[503] |= with_headers(503, "Retry-After")[503]
    return responses


def problems_as_sent(document: dict[str, Any]) -> None:
    """Document each problem under the one media type it is sent as. FastAPI puts a response's
    model under the route's own media type (application/json), which no problem is sent as,
    and leaves application/problem+json without a schema; the schema moves over, in place."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if PROBLEM_JSON in content and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
