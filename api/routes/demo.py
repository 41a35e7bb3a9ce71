"""`GET /demo`: the flash-sale demo page (docs/flash-sale-demo.html), the client contract of
docs/frontend.md at work in a browser."""

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from shared.errors import NotFound

PAGE = Path(__file__).resolve().parents[2] / "docs" / "flash-sale-demo.html"

router = APIRouter(tags=["demo"])


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/demo", response_class=HTMLResponse, include_in_schema=False)
async def demo() -> HTMLResponse:
    """The demo page: buy, follow the status over server-sent events, answer a hold."""
    try:
        return HTMLResponse(_page())
    except FileNotFoundError:
        raise NotFound("The demo page is not part of this installation.") from None
