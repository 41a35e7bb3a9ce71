"""The protocol reads a request's target into the scope as uvicorn reads it, whether it parses the
target or takes the reading it kept from an earlier request that sent the same one."""

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from api.http_server import (
    _TARGET_KEPT_BYTES,
    _TARGETS,
    _TARGETS_MAX,
    BoundedHeadProtocol,
    _target,
)
from tests.api.test_response_writer import RecordingTransport

Scope = dict[str, Any]

TARGETS = [
    b"/events/0c7f4d6e-8a55-4b0e-9c5c-0a1b2c3d4e5f/tickets/purchase",
    b"/purchases/0c7f4d6e-8a55-4b0e-9c5c-0a1b2c3d4e5f?wait=5",
    b"/a%20b/c?x=1&y=%41",
    b"/caf%C3%A9/%2F",
    b"/p?",
    b"/p?%",
    b"//double//slashes",
    b"http://example.com/absolute/form?q=1",
    b"/" + b"long" * 100 + b"?past-what-is-kept",
    b"*",
]
# What the scope says of the target.
PARTS = ("path", "raw_path", "query_string", "root_path")


def served(
    protocol_class: type[HttpToolsProtocol], target: bytes, root_path: str
) -> tuple[Scope | None, bytes]:
    """What an app behind `protocol_class` saw of a GET of `target` (None if it was not called),
    and what the client was sent."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def serve() -> bytes:
        config = Config(app, lifespan="off", log_level="warning", root_path=root_path)
        config.load()
        protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET " + target + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        for _ in range(100):
            if transport.writes:
                break
            await asyncio.sleep(0.01)
        protocol.connection_lost(None)
        return b"".join(transport.writes)

    sent = asyncio.run(serve())
    return (seen[0] if seen else None), sent.split(b"\r\n", 1)[0]


def parts(scope: Scope | None) -> dict[str, Any] | None:
    return None if scope is None else {part: scope[part] for part in PARTS}


@pytest.mark.parametrize("root_path", ["", "/api"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_target_is_read_as_uvicorn_reads_it_and_again_from_the_kept_reading(
    target: bytes, root_path: str
) -> None:
    uvicorns, uvicorns_status = served(HttpToolsProtocol, target, root_path)
    for _ in range(2):
        ours, status = served(BoundedHeadProtocol, target, root_path)
        assert (parts(ours), status) == (parts(uvicorns), uvicorns_status)


def test_a_reading_kept_under_one_root_path_is_not_taken_under_another() -> None:
    target = b"/a%20b?x=1"
    for root_path in ("", "/api", "", "/shop"):
        scope, _ = served(BoundedHeadProtocol, target, root_path)
        assert scope is not None
        assert (scope["path"], scope["raw_path"]) == (
            f"{root_path}/a b",
            f"{root_path}/a%20b".encode(),
        )


def test_short_targets_are_kept_long_ones_are_not_and_the_whole_is_bounded() -> None:
    _TARGETS.clear()
    served(BoundedHeadProtocol, b"/short?x=1", "")
    long = b"/" + b"x" * _TARGET_KEPT_BYTES
    served(BoundedHeadProtocol, long, "")

    assert b"/short?x=1" in _TARGETS
    assert long not in _TARGETS

    for n in range(2 * _TARGETS_MAX):
        _target(b"/t/%d" % n, "")
        assert len(_TARGETS) <= _TARGETS_MAX
