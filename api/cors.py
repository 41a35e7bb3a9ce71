"""CORS: Starlette's middleware, with the preflights it refuses answered as problems."""

import time

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api import metrics
from api.problems import instance_of, problem_response

# The route label of CORS preflights in the request metrics.
PREFLIGHT = "preflight"


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS logic, unchanged but for one answer: a preflight it refuses, which it
    answers `400 text/plain` ("Disallowed CORS method"), is answered as a problem+json that
    names what was refused, with every header Starlette set on its own answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            # What Starlette takes for a preflight.
            if "origin" in headers and "access-control-request-method" in headers:
                started = time.perf_counter()
                answer = self._preflight(scope, headers)
                await answer(scope, receive, send)
                # Answered before any route: counted as the routes' answers are, on its own.
                elapsed = time.perf_counter() - started
                metrics.record("OPTIONS", PREFLIGHT, answer.status_code, elapsed)
                return
        await super().__call__(scope, receive, send)

    def _preflight(self, scope: Scope, headers: Headers) -> Response:
        answer = self.preflight_response(request_headers=headers)
        if answer.status_code != 400:
            return answer
        kept = {
            name: value
            for name, value in answer.headers.items()
            if name not in ("content-type", "content-length")
        }
        # Starlette's own words only should the two ever disagree on what was refused.
        reasons = "; ".join(self._refused(headers)) or bytes(answer.body).decode("latin-1")
        return problem_response(
            400,
            "CORS preflight refused",
            f"{reasons[:1].upper()}{reasons[1:]}.",
            instance=instance_of(scope),
            headers=kept,
        )

    def _refused(self, headers: Headers) -> list[str]:
        """What the preflight asks that Starlette's checks refuse, each named with the
        request's own value and what is allowed instead."""
        refused: list[str] = []
        origin = headers["origin"]
        if not self.is_allowed_origin(origin=origin):
            refused.append(f"the origin {origin} is not allowed")
        method = headers["access-control-request-method"]
        if method not in self.allow_methods:
            allowed = ", ".join(self.allow_methods)
            refused.append(f"the method {method} is not allowed (allowed: {allowed})")
        requested = headers.get("access-control-request-headers")
        if requested is not None and not self.allow_all_headers:
            names = [name.strip() for name in requested.lower().split(",")]
            if others := [name for name in names if name not in self.allow_headers]:
                allowed = ", ".join(self.allow_headers)
                refused.append(
                    f"the headers {', '.join(others)} are not allowed (allowed: {allowed})"
                )
        if "access-control-request-private-network" in headers and not self.allow_private_network:
            refused.append("private network access is not allowed")
        return refused
