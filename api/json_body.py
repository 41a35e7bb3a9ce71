"""Request bodies read as JSON in UTF-8, the only encoding RFC 8259 allows between systems.

Python's json module, given bytes, also reads UTF-16 and UTF-32 (it guesses from the first
bytes), so a body in either, labelled plain `application/json`, was accepted, where the same body
declared as `charset=utf-16` is refused (415). Every route reads its JSON here instead: the
routes that read their own body (api/purchase_contract.py) through `read_json`, the FastAPI
routes with a body model through `Utf8JsonRoute`. A body that is not UTF-8 is malformed JSON,
a 400, as one in Latin-1 already was.
"""

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

_BOM = "\ufeff"


def read_json(body: bytes) -> Any:
    """The JSON value of `body`, read as json.loads reads UTF-8 bytes (a byte-order mark skipped,
    an encoded lone surrogate kept for the validators to refuse), and only UTF-8: otherwise
    UnicodeDecodeError, a ValueError, as for any body json cannot read."""
    text = body.decode("utf-8", "surrogatepass")
    return json.loads(text[1:] if text.startswith(_BOM) else text)


class Utf8JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = read_json(await self.body())
        return self._json


class Utf8JsonRoute(APIRoute):
    """A route whose body model FastAPI reads through `read_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(Utf8JsonRequest(request.scope, request.receive, request._send))

        return handle
