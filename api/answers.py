"""A framework-free HTTP answer: status, headers and body, decided once.

The contract functions (api/purchase_contract.py) and the problem writer (api/problems.py)
return one; the routes hand it to Starlette as a Response, the raw-ASGI dispatch
(api/fast_paths.py) sends it as it is. Either way the client gets the same bytes.
"""

from typing import NamedTuple

from starlette.responses import Response
from starlette.types import Send

JSON = "application/json"
_WITHOUT_CONTENT = frozenset({204, 304})


class Answer(NamedTuple):  # a tuple: built once per request, the cheapest immutable record
    status: int
    body: bytes
    media_type: str | None = JSON  # None: no body, and no Content-Type
    headers: tuple[tuple[str, str], ...] = ()  # besides Content-Type and Content-Length

    def response(self) -> Response:
        return Response(
            self.body,
            status_code=self.status,
            media_type=self.media_type,
            headers=dict(self.headers),
        )

    async def send(self, send: Send, *, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Send it as ASGI messages, with `extra` raw headers added (the middleware's)."""
        # A loop, not a comprehension: that would be a function call more per answer.
        headers: list[tuple[bytes, bytes]] = []
        for name, value in self.headers:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        if self.status not in _WITHOUT_CONTENT:  # as Starlette: these carry no length
            headers.append((b"content-length", b"%d" % len(self.body)))
        if self.media_type is not None:
            headers.append((b"content-type", self.media_type.encode()))
        headers.extend(extra)
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})
