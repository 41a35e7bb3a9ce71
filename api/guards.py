"""ASGI middleware that refuses what must never reach a route: oversized bodies, and bodies not
declared as JSON by one Content-Type, in UTF-8 and uncompressed."""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import instance_of, problem

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(HTTPException):
    """Raised while a body without Content-Length streams in; FastAPI lets an HTTPException from
    the body read through, and the error handler answers 413."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, f"The request body must be at most {max_body_bytes} bytes.")


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def charset_of(content_type: bytes) -> bytes | None:
    """The charset parameter of a Content-Type, lowercased and unquoted; None without one."""
    for parameter in content_type.split(b";")[1:]:
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"charset":
            return value.strip().strip(b'"').lower()
    return None


# What JSON may be said to be in: UTF-8 (RFC 8259), by its name, its common alias, or ASCII,
# which is UTF-8 too.
_UTF8 = frozenset({None, b"utf-8", b"utf8", b"us-ascii"})


def in_utf8(content_type: bytes) -> bool:
    """Whether a body of this Content-Type is UTF-8, as the routes read it (no charset says
    nothing else)."""
    return charset_of(content_type) in _UTF8


def coded(given: list[tuple[bytes, bytes]]) -> bool:
    """Whether a body is sent with a content coding (gzip, br, ...), in any Content-Encoding it
    names: none is decoded here, so a compressed body would be misread as JSON, and a plain one
    labelled so is a client bug."""
    for name, value in given:
        if name == b"content-encoding":
            for coding in value.split(b","):
                if coding.strip().lower() not in (b"", b"identity"):
                    return True
    return False


def _conflicting_content_types(headers: list[tuple[bytes, bytes]]) -> bool:
    """Content-Type given twice with different values: which one describes the body cannot
    be told, and the guard (the last one) and the body's parser (the first) would disagree."""
    return len({value for name, value in headers if name == b"content-type"}) > 1


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        given: list[tuple[bytes, bytes]] = scope["headers"]
        headers = dict(given)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(scope, send)
            return
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        has_body = declared != b"0" and (declared is not None or b"transfer-encoding" in headers)
        # (Only when some header is repeated, which one dict built in C tells.)
        if has_body and len(headers) != len(given) and _conflicting_content_types(given):
            await problem(
                415,
                "Unsupported media type",
                "Content-Type is given more than once, with different values: send it once, "
                "as application/json.",
                instance=instance_of(scope),
            ).send(send)
            return
        if has_body and not _is_json(content_type):
            await problem(
                415,
                "Unsupported media type",
                "Send the request body as JSON with Content-Type: application/json.",
                instance=instance_of(scope),
            ).send(send)
            return
        if has_body and coded(given):
            await problem(
                415,
                "Unsupported media type",
                "Send the request body uncompressed, with no Content-Encoding.",
                instance=instance_of(scope),
                # What RFC 9110 asks a 415 for a content coding to say: none but the identity.
                headers={"Accept-Encoding": "identity"},
            ).send(send)
            return
        if has_body and not in_utf8(headers.get(b"content-type", b"")):
            await problem(
                415,
                "Unsupported media type",
                "Send the request body as JSON in UTF-8: no charset, or charset=utf-8.",
                instance=instance_of(scope),
            ).send(send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if response_started:
                raise
            await self._too_large(scope, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await problem(
            413,
            "Content too large",
            f"The request body must be at most {self.max_body_bytes} bytes.",
            instance=instance_of(scope),
        ).send(send)
