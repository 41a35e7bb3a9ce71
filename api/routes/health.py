"""Liveness and readiness probes."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.deps import ResourcesDep
from api.problems import problem_response, problem_responses
from api.resources import Resources
from shared.db import database_answers

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (it answers); says nothing about its dependencies."""
    return {"status": "ok"}


@router.get("/readyz", responses=problem_responses(503))
async def readyz(request: Request, resources: ResourcesDep) -> Response:
    """PostgreSQL answers, the broker channel is open and its node answers; else 503."""
    # Side by side: a probe's timeout (2-3 s) must not wait for both.
    postgresql, rabbitmq = await asyncio.gather(
        database_answers(resources.pool, timeout_s=PROBE_TIMEOUT_S), _broker_ok(resources)
    )
    checks = {"postgresql": postgresql, "rabbitmq": rabbitmq}
    if all(checks.values()):
        return JSONResponse({"status": "ready", "checks": {k: "ok" for k in checks}})
    down = ", ".join(name for name, ok in checks.items() if not ok)
    return problem_response(
        503,
        "Not ready",
        f"Unavailable: {down}.",
        instance=request.url.path,
        headers={"Retry-After": "1"},
    )


async def _broker_ok(resources: Resources) -> bool:
    # A hung node keeps the connection open for 18 s: only asking it tells.
    return resources.publisher.check_ready() and await resources.broker.answers(PROBE_TIMEOUT_S)
