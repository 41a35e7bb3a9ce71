"""Dependencies routes declare with Annotated aliases; all come from the lifespan's Resources.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a thread pool, which on
the purchase path costs more than the request itself.
"""

from typing import Annotated

from fastapi import Depends, Request

from api.resources import Resources
from shared.events.service import EventService
from shared.purchases.service import PurchaseService


async def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


# Straight from the request, not through ResourcesDep: one dependency to solve instead of two on
# the purchase path, where FastAPI's per-dependency work is a visible share of each request.
async def get_event_service(request: Request) -> EventService:
    resources: Resources = request.app.state.resources
    return resources.events


async def get_purchase_service(request: Request) -> PurchaseService:
    resources: Resources = request.app.state.resources
    return resources.purchases


EventServiceDep = Annotated[EventService, Depends(get_event_service)]
PurchaseServiceDep = Annotated[PurchaseService, Depends(get_purchase_service)]
