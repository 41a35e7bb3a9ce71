"""What uvicorn's ProxyHeadersMiddleware does to a request's scope, done by the HTTP protocol as
it reads the request instead of by a middleware around the app.

As a middleware it costs every request a coroutine more and a look-up of its client among the
trusted proxies, a tenth of what the raw-ASGI ceiling spends on a request. The protocol asks once
per connection whether its client is a trusted proxy, and only a trusted one's requests are read
for `X-Forwarded-Proto` and `X-Forwarded-For`. The settings are uvicorn's (`proxy_headers`,
`forwarded_allow_ips`, FORWARDED_ALLOW_IPS): the protocol takes the middleware uvicorn built from
them off the app, and uses its trusted hosts. tests/api/test_proxy_headers.py holds what this
does to what the middleware does.
"""

from uvicorn._types import ASGI3Application, HTTPScope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware, _TrustedHosts

# uvicorn's list: a ws or wss an http request is forwarded with becomes its scheme as it is.
_SCHEMES = frozenset({"http", "https", "ws", "wss"})

TrustedProxies = _TrustedHosts


def unwrap(app: ASGI3Application) -> tuple[ASGI3Application, TrustedProxies | None]:
    """The app without uvicorn's proxy-headers middleware, and its trusted proxies (None if
    uvicorn was not asked to read forwarded headers)."""
    if isinstance(app, ProxyHeadersMiddleware):
        return app.app, app.trusted_hosts
    return app, None


def trusts(proxies: TrustedProxies, client: tuple[str, int] | None) -> bool:
    """Whether requests on a connection from `client` are read for forwarded headers."""
    return (client[0] if client else None) in proxies


def apply_forwarded(proxies: TrustedProxies, scope: HTTPScope) -> None:
    """Set the scope's scheme and client from a trusted proxy's forwarded headers."""
    proto: bytes | None = None
    forwarded_for: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-proto":
            proto = value
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
    if proto is not None:
        scheme = proto.decode("latin1").strip()
        if scheme in _SCHEMES:
            scope["scheme"] = scheme
    if forwarded_for:
        chain = b", ".join(forwarded_for).decode("latin1")
        host, port = proxies.get_trusted_client_address(chain)
        if host:  # an empty header gives no client to set (uvicorn#1068)
            scope["client"] = (host, port)
