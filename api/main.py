"""The API application: create_app() and its lifespan."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.cors import ProblemCORSMiddleware
from api.draining import release_on_stop
from api.errors import install_error_handlers
from api.fast_paths import FastPaths
from api.guards import RequestGuard
from api.methods import AnswerHeadAsGet
from api.metrics import RequestMetrics, counting_status_waiters
from api.metrics import router as metrics_router
from api.problems import problems_as_sent
from api.resources import Resources, open_resources
from api.routes import demo, events, health, purchases
from shared.gc_tuning import tune_gc
from shared.settings import Settings, get_settings

DESCRIPTION = """
Ticket sales that survive a flash sale. Purchases are accepted here (`202`), queued durably in
RabbitMQ and decided by workers; poll `GET /purchases/{id}` (honour `Retry-After`) for the outcome.
Every error is `application/problem+json` (RFC 9457).
"""


class TicketingAPI(FastAPI):
    """FastAPI, with every HTTP request offered first to the raw-ASGI dispatch of the purchase
    and the status poll (api/fast_paths.py), which serves the unremarkable ones before the
    middleware stack and hands the rest to `framework`: the whole app, as FastAPI runs it."""

    fast_paths: FastPaths | None = None
    # Starlette's CORS options; applied outside the whole stack (see build_middleware_stack).
    cors: dict[str, Any] | None = None
    # What the lifespan opened: an attribute of its own rather than only an entry of app.state,
    # whose lookups go through a Python-level __getattr__ on every purchase.
    resources: Resources | None = None

    def serve_with(self, resources: Resources) -> None:
        self.resources = resources
        self.state.resources = resources

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_paths is not None and scope["type"] == "http":
            await self.fast_paths(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        # Outside even the server error middleware, which Starlette puts outside every
        # middleware added: its 500 carries the CORS headers too, or a page sees no answer.
        stack = super().build_middleware_stack()
        return stack if self.cors is None else ProblemCORSMiddleware(stack, **self.cors)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            # FastAPI builds the document once and keeps it: adjusted once, in place.
            problems_as_sent(super().openapi())
        return super().openapi()


ROUTERS = (events.router, purchases.router, health.router, metrics_router, demo.router)


def cors_options(settings: Settings) -> dict[str, Any]:
    return {
        "allow_origins": settings.cors_origins,
        "allow_methods": ["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"],
        "allow_headers": [
            "Content-Type",
            "Idempotency-Key",
            "If-Match",
            "If-None-Match",
            "Last-Event-ID",
        ],
        "expose_headers": ["Location", "Retry-After", "ETag"],
        "max_age": 600,
    }


def create_app(settings: Settings | None = None) -> TicketingAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with open_resources(settings) as resources:
            app.serve_with(resources)  # the app built below
            tune_gc()
            waiters = resources.waiters
            with (
                release_on_stop(resources.purchases.release_waiters),
                counting_status_waiters(lambda: waiters.held),
            ):
                yield

    app = TicketingAPI(
        title="Ticketing API",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Each path is an exact contract. Redirecting `/events/` to `/events` would also build
        # the Location from the request's Host header, an address the client chose.
        redirect_slashes=False,
    )
    install_error_handlers(app)
    app.add_middleware(AnswerHeadAsGet)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, routers=ROUTERS)
    # Outermost: every answer, a 413, a 503 or a 500, carries the CORS headers a browser needs.
    app.cors = cors_options(settings)
    app.fast_paths = FastPaths(app, max_body_bytes=settings.max_body_bytes, cors_options=app.cors)
    for router in ROUTERS:
        app.include_router(router)
    return app
