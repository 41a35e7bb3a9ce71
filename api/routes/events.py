"""Events: create, list, read, update, delete."""

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status

from api.deps import EventServiceDep
from api.json_body import Utf8JsonRoute
from api.problems import problem_responses
from api.response_headers import with_headers
from shared.errors import InvalidRequest
from shared.events.models import Event, EventCreate, EventPage, EventUpdate

router = APIRouter(prefix="/events", tags=["events"], route_class=Utf8JsonRoute)

IfMatch = Annotated[
    str | None,
    Header(
        description='The event\'s version as its ETag (`"3"`): the change applies only if the '
        "event is still at that version (or at one of a list of them), else 412. The "
        'comparison is strong: a weak tag (`W/"3"`) never matches.',
    ),
]


def expected_versions(request: Request, if_match: IfMatch = None) -> frozenset[int] | None:
    """The versions If-Match names, from every line of it: a header given twice is one list
    (RFC 9110 §5.3), not its first line (the declared parameter documents it, and reads one)."""
    if if_match is None:
        return None
    return parse_if_match(", ".join(request.headers.getlist("if-match")))


ExpectedVersions = Annotated[frozenset[int] | None, Depends(expected_versions)]


def etag(event: Event) -> str:
    return f'"{event.version}"'


def parse_if_match(value: str | None) -> frozenset[int] | None:
    """The versions If-Match names; None for any (no header, or `*`).

    If-Match is compared strongly (RFC 9110 §13.1.1): a weak tag names a version this request
    must not change, so it names none here, and a list of only weak tags matches nothing."""
    if value is None or value.strip() == "*":
        return None
    tags = [tag.strip() for tag in value.split(",") if tag.strip()]
    if not tags:
        raise _not_an_etag()
    versions = [(_version(tag), tag.startswith("W/")) for tag in tags]
    return frozenset(version for version, weak in versions if not weak)


def _version(tag: str) -> int:
    """The version an entity-tag (`"3"`, `W/"3"`) names. A tag this API never sends is refused,
    never read as a version: `3` or `"3` (the quotes are part of the tag), `"x"`, `"03"` (strong
    comparison is character by character: `"03"` is not `"3"`)."""
    opaque = tag.removeprefix("W/")
    quoted = len(opaque) >= 2 and opaque[0] == opaque[-1] == '"'
    digits = opaque[1:-1] if quoted else ""
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 9:
        raise _not_an_etag()
    if str(int(digits)) != digits:
        raise _not_an_etag()
    return int(digits)


def _not_an_etag() -> InvalidRequest:
    return InvalidRequest(
        'If-Match must be an ETag of this API, such as "3", or a list of them.',
        location=("header", "If-Match"),
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Event,
    responses={
        **with_headers(201, "Location", "ETag"),
        **problem_responses(400, 413, 415, 422, 503),
    },
)
async def create_event(
    body: EventCreate, events: EventServiceDep, request: Request, response: Response
) -> Event:
    event = await events.create(body)
    # Under the app's mount point, as a purchase's status_url.
    response.headers["Location"] = f"{request.scope.get('root_path', '')}/events/{event.id}"
    response.headers["ETag"] = etag(event)
    return event


@router.get("", response_model=EventPage, responses=problem_responses(422, 503))
async def list_events(
    events: EventServiceDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> EventPage:
    return await events.list(limit=limit, cursor=cursor)


@router.get(
    "/{event_id}",
    response_model=Event,
    responses={**with_headers(200, "ETag"), **problem_responses(404, 422, 503)},
)
async def get_event(event_id: UUID, events: EventServiceDep, response: Response) -> Event:
    event = await events.get(event_id)
    response.headers["ETag"] = etag(event)
    return event


@router.patch(
    "/{event_id}",
    response_model=Event,
    responses={
        **with_headers(200, "ETag"),
        **problem_responses(400, 404, 409, 412, 413, 415, 422, 503),
    },
)
async def update_event(
    event_id: UUID,
    body: EventUpdate,
    events: EventServiceDep,
    response: Response,
    expected: ExpectedVersions,
) -> Event:
    event = await events.update(event_id, body, expected_versions=expected)
    response.headers["ETag"] = etag(event)
    return event


@router.delete(
    "/{event_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    # Not the default JSONResponse, which labels even no content as JSON.
    response_class=Response,
    responses=problem_responses(404, 409, 412, 422, 503),
)
async def delete_event(event_id: UUID, events: EventServiceDep, expected: ExpectedVersions) -> None:
    await events.delete(event_id, expected_versions=expected)
