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


async def get_event_service(resources: ResourcesDep) -> EventService:
    return resources.events


async def get_purchase_service(resources: ResourcesDep) -> PurchaseService:
    return resources.purchases


EventServiceDep = Annotated[EventService, Depends(get_event_service)]
PurchaseServiceDep = Annotated[PurchaseService, Depends(get_purchase_service)]
