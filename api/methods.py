"""Which methods a path answers: what a 405's `Allow` names (RFC 9110 §15.5.6), and HEAD
answered wherever GET is (RFC 9110 §9.1), without a HEAD operation of its own in the routes or
the OpenAPI document."""

from collections.abc import Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The methods of RFC 9110 §9, and PATCH, in the order an `Allow` lists them.
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> list[str]:
    """Every method that some route answers at the request's path.

    Asked of the routes themselves, each method in turn: a route matches in full only a method
    it answers, and this works through included routers as the router's own matching does. The
    router's 405 knows only the first route whose path matched (`/events` has one route for GET
    and another for POST). Only worth its cost on a 405."""
    routes = list(routes)
    allowed = {method for method in KNOWN_METHODS if _answered(routes, scope, method)}
    if "GET" in allowed:
        allowed.add("HEAD")  # AnswerHeadAsGet
    return [method for method in KNOWN_METHODS if method in allowed]


def _answered(routes: list[BaseRoute], scope: Scope, method: str) -> bool:
    for route in routes:
        # A scope of its own for each question: matching may leave notes in it.
        probe = {
            "type": "http",
            "method": method,
            "path": scope["path"],
            "root_path": scope.get("root_path", ""),
        }
        if route.matches(probe)[0] is Match.FULL:
            return True
    return False


_END_OF_BODY: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class AnswerHeadAsGet:
    """A HEAD is routed as the GET of the same path, and answered with that GET's status and
    headers (Content-Length included, as RFC 9110 §9.3.2 allows) and no body.

    The answer is complete as soon as its head is sent, not when the GET's body would have
    ended: the server then tells the app that the client is gone (receive() answers
    `http.disconnect` once the response is complete, per the ASGI spec), so a status event
    stream stops at once rather than being held for minutes for a client that wants no body.
    Whatever the app sends after the head is dropped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        # A scope of its own: the server's still says HEAD, so it writes no body either.
        as_get = {**scope, "method": "GET"}
        head_sent = False

        async def head_only(message: Message) -> None:
            nonlocal head_sent
            if head_sent:
                return
            await send(message)
            if message["type"] == "http.response.start":
                head_sent = True
                await send(_END_OF_BODY)

        try:
            await self.app(as_get, receive, head_only)
        finally:
            # The route the router found, for the request metrics outside this layer.
            if "route" in as_get:
                scope["route"] = as_get["route"]
