"""Dependencies routes declare with Annotated aliases; all come from the lifespan's Resources.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a thread pool, which on
the purchase path costs more than the request itself.
"""

from typing import Annotated

from fastapi import Depends, Request
from starlette.applications import Starlette

from api.resources import Resources
from shared.events.service import EventService
from shared.purchases.changes import StatusWaiters
from shared.purchases.models import Purchase
from shared.purchases.service import PurchaseService
from shared.settings import Settings


def resources_of(app: Starlette) -> Resources:
    """What the app's lifespan opened (api/main.py)."""
    resources: Resources | None = getattr(app, "resources", None)
    if resources is None:
        raise RuntimeError("the app's resources are opened by its lifespan, which has not run")
    return resources


async def get_resources(request: Request) -> Resources:
    return resources_of(request.app)


ResourcesDep = Annotated[Resources, Depends(get_resources)]


# Straight from the request, not through ResourcesDep: one dependency to solve instead of two on
# the purchase path, where FastAPI's per-dependency work is a visible share of each request.
async def get_event_service(request: Request) -> EventService:
    return resources_of(request.app).events


def purchase_service_of(app: Starlette) -> PurchaseService:
    """The app's purchase service: what the dependency below gives the routes, and what the
    raw-ASGI dispatch uses (it steps aside whenever dependency_overrides are set)."""
    return resources_of(app).purchases


async def get_purchase_service(request: Request) -> PurchaseService:
    return purchase_service_of(request.app)


def status_waiters_of(app: Starlette) -> StatusWaiters[Purchase]:
    """The app's held status requests (what an event stream pauses on between two reads)."""
    return resources_of(app).waiters


async def get_status_waiters(request: Request) -> StatusWaiters[Purchase]:
    return status_waiters_of(request.app)


EventServiceDep = Annotated[EventService, Depends(get_event_service)]
PurchaseServiceDep = Annotated[PurchaseService, Depends(get_purchase_service)]
StatusWaitersDep = Annotated[StatusWaiters[Purchase], Depends(get_status_waiters)]


def settings_of(app: Starlette) -> Settings:
    """The app's settings, as the dependency below gives them to the routes."""
    return resources_of(app).settings


async def get_settings_of_app(request: Request) -> Settings:
    return settings_of(request.app)


SettingsDep = Annotated[Settings, Depends(get_settings_of_app)]
