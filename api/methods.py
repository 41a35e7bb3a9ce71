"""Which methods a path answers: what a 405's `Allow` names (RFC 9110 §15.5.6)."""

from collections.abc import Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import Scope

# The methods of RFC 9110 §9, and PATCH, in the order an `Allow` lists them.
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> list[str]:
    """Every method that some route answers at the request's path.

    Asked of the routes themselves, each method in turn: a route matches in full only a method
    it answers, and this works through included routers as the router's own matching does. The
    router's 405 knows only the first route whose path matched (`/events` has one route for GET
    and another for POST). Only worth its cost on a 405."""
    routes = list(routes)
    return [method for method in KNOWN_METHODS if _answered(routes, scope, method)]


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
