"""The protocol reads a trusted proxy's X-Forwarded-Proto and X-Forwarded-For into the request's
scope exactly as uvicorn's ProxyHeadersMiddleware does, without the middleware around the app."""

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.server import ServerState

from api.http_server import BoundedHeadProtocol
from api.proxy_headers import apply_forwarded, trusts, unwrap
from tests.api.test_response_writer import RecordingTransport

Scope = dict[str, Any]

TRUSTED = ["127.0.0.1", "*", "10.0.0.0/8, 192.168.1.1", "proxy.internal", ""]
CLIENTS: list[tuple[str, int] | None] = [
    ("127.0.0.1", 50000),
    ("10.1.2.3", 1),
    ("192.168.1.1", 2),
    ("203.0.113.9", 3),
    ("proxy.internal", 0),
    None,
]
HEADERS: list[list[tuple[bytes, bytes]]] = [
    [],
    [(b"host", b"x"), (b"content-length", b"2")],
    [(b"x-forwarded-proto", b"https")],
    [(b"x-forwarded-proto", b" https ")],
    [(b"x-forwarded-proto", b"wss")],
    [(b"x-forwarded-proto", b"ftp")],
    [(b"x-forwarded-proto", b"http"), (b"x-forwarded-proto", b"https")],
    [(b"x-forwarded-for", b"198.51.100.7")],
    [(b"x-forwarded-for", b"198.51.100.7:4321")],
    [(b"x-forwarded-for", b"198.51.100.7, 10.0.0.2, 127.0.0.1")],
    [(b"x-forwarded-for", b"198.51.100.7"), (b"x-forwarded-for", b"10.9.9.9")],
    [(b"x-forwarded-for", b"[2001:db8::1]:8080")],
    [(b"x-forwarded-for", b"")],
    [(b"x-forwarded-for", b"127.0.0.1, 10.0.0.1")],
    [(b"x-forwarded-for", b"not an address")],
    [(b"x-forwarded-for", b"caf\xe9")],
    [(b"x-forwarded-proto", b"https"), (b"x-forwarded-for", b"198.51.100.7")],
]


def scope_of(client: tuple[str, int] | None, headers: list[tuple[bytes, bytes]]) -> Scope:
    return {
        "type": "http",
        "scheme": "http",
        "client": client,
        "server": ("127.0.0.1", 8000),
        "headers": headers,
    }


def by_the_middleware(trusted: str, scope: Scope) -> Scope:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope)

    asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=trusted)(scope, None, None))  # type: ignore[arg-type]
    return seen[0]


def by_the_protocol(trusted: str, scope: Scope) -> Scope:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        pass

    inner, proxies = unwrap(ProxyHeadersMiddleware(app, trusted_hosts=trusted))  # type: ignore[arg-type]
    assert inner is app
    assert proxies is not None
    if trusts(proxies, scope["client"]):
        apply_forwarded(proxies, scope)  # type: ignore[arg-type]
    return scope


@pytest.mark.parametrize("trusted", TRUSTED)
@pytest.mark.parametrize("client", CLIENTS)
def test_the_scope_is_what_uvicorns_middleware_makes_of_it(
    trusted: str, client: tuple[str, int] | None
) -> None:
    for headers in HEADERS:
        scope = scope_of(client, headers)
        expected = by_the_middleware(trusted, copy.deepcopy(scope))
        assert by_the_protocol(trusted, copy.deepcopy(scope)) == expected, headers


def test_some_case_changes_the_scope() -> None:
    """The comparison above compares changes, not only scopes left alone."""
    scope = scope_of(("127.0.0.1", 1), HEADERS[-1])
    changed = by_the_middleware("127.0.0.1", copy.deepcopy(scope))
    assert changed["scheme"] == "https"
    assert changed["client"] == ("198.51.100.7", 0)


def seen_by_the_app(
    request: bytes, *, peer: str, **config: Any
) -> tuple[Scope, BoundedHeadProtocol, Callable[..., Any]]:
    """The scope the app gets for `request`, sent from `peer` to the server `python -m api`
    runs (its protocol, uvicorn's settings)."""
    scopes, protocol, app = all_seen_by_the_app(request, peer=peer, **config)
    assert len(scopes) == 1
    return scopes[0], protocol, app


def all_seen_by_the_app(
    requests: bytes, *, peer: str, **config: Any
) -> tuple[list[Scope], BoundedHeadProtocol, Callable[..., Any]]:
    """The scopes the app gets for `requests` (one or more, in one read), as above."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Callable[..., Any], send: Any) -> None:
        seen.append(scope)
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    class FromPeer(RecordingTransport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            if name == "peername":
                return (peer, 40000)
            return super().get_extra_info(name, default)

    async def serve() -> BoundedHeadProtocol:
        settings = Config(app, lifespan="off", log_level="warning", **config)
        protocol = BoundedHeadProtocol(config=settings, server_state=ServerState(), app_state={})
        transport = FromPeer()
        protocol.connection_made(transport)
        protocol.data_received(requests)
        for _ in range(100):
            if len(transport.writes) == requests.count(b"\r\n\r\n"):
                break
            await asyncio.sleep(0.01)
        protocol.connection_lost(None)
        return protocol

    protocol = asyncio.run(serve())
    return seen, protocol, app


FORWARDED = (
    b"GET /a HTTP/1.1\r\nhost: x\r\nX-Forwarded-Proto: https\r\n"
    b"X-Forwarded-For: 198.51.100.7, 10.0.0.2\r\n\r\n"
)


def test_a_trusted_proxys_forwarded_headers_reach_the_app_without_the_middleware() -> None:
    scope, protocol, app = seen_by_the_app(FORWARDED, peer="127.0.0.1")
    assert (scope["scheme"], scope["client"]) == ("https", ("10.0.0.2", 0))
    assert protocol.app is app  # the middleware was taken off: no coroutine of its own


def test_the_trusted_proxies_are_uvicorns_setting() -> None:
    scope, _, _ = seen_by_the_app(FORWARDED, peer="10.0.0.9", forwarded_allow_ips="10.0.0.0/8")
    assert (scope["scheme"], scope["client"]) == ("https", ("198.51.100.7", 0))


def test_another_clients_forwarded_headers_are_ignored() -> None:
    scope, _, _ = seen_by_the_app(FORWARDED, peer="203.0.113.9")
    assert (scope["scheme"], scope["client"]) == ("http", ("203.0.113.9", 40000))


def test_without_proxy_headers_nothing_is_read() -> None:
    scope, protocol, app = seen_by_the_app(FORWARDED, peer="127.0.0.1", proxy_headers=False)
    assert (scope["scheme"], scope["client"]) == ("http", ("127.0.0.1", 40000))
    assert protocol.app is app


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"X-Forwarded-Proto: https", ("https", ("127.0.0.1", 40000))),
        (b"x-forwarded-for: 198.51.100.7", ("http", ("198.51.100.7", 0))),
    ],
)
def test_either_forwarded_header_alone_is_read(
    header: bytes, expected: tuple[str, tuple[str, int]]
) -> None:
    scope, _, _ = seen_by_the_app(
        b"GET /a HTTP/1.1\r\nhost: x\r\n" + header + b"\r\n\r\n", peer="127.0.0.1"
    )
    assert (scope["scheme"], scope["client"]) == expected


def test_a_forwarded_request_does_not_lend_its_headers_to_the_next_on_its_connection() -> None:
    """Pipelined: the first request's forwarded headers are read, the second has none."""
    scopes, _, _ = all_seen_by_the_app(
        FORWARDED + b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n", peer="127.0.0.1"
    )
    assert [(scope["scheme"], scope["client"]) for scope in scopes] == [
        ("https", ("10.0.0.2", 0)),
        ("http", ("127.0.0.1", 40000)),
    ]
