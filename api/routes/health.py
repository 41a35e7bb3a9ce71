"""Liveness and readiness probes."""

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.deps import ResourcesDep
from api.problems import problem_response, problem_responses

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (it answers); says nothing about its dependencies."""
    return {"status": "ok"}


@router.get("/readyz", responses=problem_responses(503))
async def readyz(request: Request, resources: ResourcesDep) -> Response:
    """PostgreSQL answers and the broker channel is open; else 503."""
    checks = {"postgresql": await _database_ok(resources), "rabbitmq": _broker_ok(resources)}
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


async def _database_ok(resources: ResourcesDep) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            async with resources.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except Exception as exc:
        log.warning("readiness: postgresql unavailable: %r", exc)
        return False
    return True


def _broker_ok(resources: ResourcesDep) -> bool:
    return resources.broker.connected and resources.publisher.check_ready()
