"""The one place where errors become HTTP responses (problem+json).

Installed as the app's exception handlers; the raw-ASGI dispatch looks its errors up in the same
table (`app.exception_handlers`), so a request answered there fails exactly as through a route.
"""

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from api.answers import Answer
from api.methods import allowed_methods
from api.problems import problem, problem_response
from shared.errors import (
    Conflict,
    DomainError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    VersionMismatch,
)
from shared.retry import TRANSIENT_DATABASE

log = logging.getLogger(__name__)

# Most specific first.
STATUS_OF: list[tuple[type[DomainError], int]] = [
    (NotFound, 404),
    (VersionMismatch, 412),
    (Conflict, 409),
    (InvalidRequest, 422),
    (ServiceUnavailable, 503),
]

HTTP_TITLES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    413: "Content too large",
    415: "Unsupported media type",
}


class InvalidInput(Exception):
    """Input that does not validate, found outside FastAPI's own parameter handling (the
    contract functions parse their bodies and headers themselves). Answered exactly as a
    RequestValidationError: 400 for malformed JSON, else 422."""

    def __init__(self, errors: Sequence[Any]) -> None:
        super().__init__(errors)
        self._errors = list(errors)

    def errors(self) -> list[Any]:
        return self._errors


def unreadable_json(exc: ValueError | RecursionError) -> InvalidInput:
    """Why Python's json module could not read a body: it is not JSON (answered 400 Malformed
    JSON), or it holds an integer of more digits than Python converts. That one is valid JSON,
    and out of every field's range: a 422, as any number out of range."""
    if type(exc) is ValueError:  # neither a JSONDecodeError nor a UnicodeDecodeError
        return InvalidInput(
            [
                {
                    "type": "number_too_long",
                    "loc": ("body",),
                    "msg": f"A number has more than {sys.get_int_max_str_digits()} digits",
                }
            ]
        )
    return InvalidInput([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}])


def _domain_error(path: str, exc: Exception) -> Answer:
    assert isinstance(exc, DomainError)
    status = next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 400)
    headers = None
    if isinstance(exc, ServiceUnavailable):
        headers = {"Retry-After": str(exc.retry_after_s)}
    errors = None
    if isinstance(exc, InvalidRequest):
        errors = [{"loc": list(exc.location), "msg": exc.detail, "type": "value_error"}]
    return problem(status, exc.title, exc.detail, instance=path, headers=headers, errors=errors)


def _clean_error(error: Any) -> dict[str, Any]:
    # Echo where and why, never the input itself: it may be 64 KiB, or not even printable.
    return {
        "loc": list(error.get("loc", ())),
        "msg": error.get("msg", ""),
        "type": error.get("type"),
    }


def _validation_error(path: str, exc: Exception) -> Answer:
    assert isinstance(exc, RequestValidationError | InvalidInput)
    errors = [_clean_error(error) for error in exc.errors()]
    if any(error["type"] == "json_invalid" for error in errors):
        return problem(
            400,
            "Malformed JSON",
            "The request body is not valid JSON.",
            instance=path,
            errors=errors,
        )
    summary = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in errors[:5]
    )
    return problem(
        422, "Invalid request", summary or "The request is invalid.", instance=path, errors=errors
    )


def _http_error(path: str, exc: Exception) -> Answer:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
        # FastAPI's own 400 for a body its json.loads could not read, but not as a syntax error
        # (not UTF-8, nested too deep, an integer of more digits than Python converts): answered
        # as the routes that read theirs themselves answer it.
        return _validation_error(path, unreadable_json(exc.__cause__))
    title = HTTP_TITLES.get(exc.status_code, "Request failed")
    detail = exc.detail if isinstance(exc.detail, str) else title
    return problem(
        exc.status_code,
        title,
        detail,
        instance=path,
        headers=dict(exc.headers) if exc.headers else None,
    )


def _method_not_allowed(request: Request, exc: Exception) -> Response:
    """A 405 that names every method the path answers, where the router's own names only those
    of the first route whose path matched."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if allowed := allowed_methods(request.app.router.routes, request.scope):
        headers["Allow"] = ", ".join(allowed)
    answered = StarletteHTTPException(405, exc.detail, headers)
    return _http_error(request.url.path, answered).response()


def _database_unavailable(path: str, exc: Exception) -> Answer:
    log.warning("database unavailable on %s: %r", path, exc)
    return problem(
        503,
        "Database unavailable",
        "The database is unavailable; retry shortly.",
        instance=path,
        headers={"Retry-After": "1"},
    )


def _client_gone(path: str, exc: Exception) -> Answer:
    """The client left before its request's body arrived whole (Starlette's ClientDisconnect):
    nobody reads this answer, but it is counted, and a client's leaving is not our error."""
    log.info("connection closed before the request body arrived whole: %s", path)
    return problem(
        400,
        "Client closed request",
        "The connection closed before the request body arrived whole.",
        instance=path,
    )


def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500,
        "Internal error",
        "Something went wrong on our side; it has been logged.",
        instance=request.url.path,
    )


class ProblemHandler:
    """An exception handler that answers with a problem. Starlette calls it with the request;
    the raw-ASGI dispatch, finding one installed, calls its `answer` with the request's path
    and sends the Answer as it is."""

    def __init__(self, answer: Callable[[str, Exception], Answer]) -> None:
        self.answer = answer

    def __call__(self, request: Request, exc: Exception) -> Response:
        return self.answer(request.url.path, exc).response()


_DATABASE_DOWN: tuple[type[BaseException], ...] = (
    *TRANSIENT_DATABASE,
    asyncpg.PostgresConnectionError,
)

# Every error answered on purpose, by type. The database ones are listed by type rather than left
# to the catch-all: Starlette answers these like any expected error, where the catch-all would
# answer and then re-raise into the server.
EXPECTED: dict[type[Exception], ProblemHandler] = {
    DomainError: ProblemHandler(_domain_error),
    RequestValidationError: ProblemHandler(_validation_error),
    InvalidInput: ProblemHandler(_validation_error),
    StarletteHTTPException: ProblemHandler(_http_error),
    ClientDisconnect: ProblemHandler(_client_gone),
    **{
        kind: ProblemHandler(_database_unavailable)
        for kind in _DATABASE_DOWN
        if issubclass(kind, Exception)
    },
}


def install_error_handlers(app: FastAPI) -> None:
    for kind, handler in EXPECTED.items():
        app.add_exception_handler(kind, handler)
    # By status, which Starlette looks up before the type: only the router raises a 405.
    app.add_exception_handler(405, _method_not_allowed)
    app.add_exception_handler(Exception, _unexpected_error)
