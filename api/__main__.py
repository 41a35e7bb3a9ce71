"""`python -m api`: serve the API with uvicorn on API_HOST:API_PORT.

It takes no arguments: everything is set by environment variables (or a .env file), listed in
README.md, "Configuration". It checks PostgreSQL, the schema and RabbitMQ first, and exits with
one line saying what is missing.
"""

import argparse
import asyncio
import errno
import logging.config
import socket
from typing import Any

import uvicorn

from api.http_server import BoundedHeadProtocol
from shared import preflight
from shared.errors import StartupError
from shared.logs import logging_config
from shared.settings import get_settings


def main() -> None:
    # No options, but `--help` answers and a stray argument is a usage error rather than
    # silently starting a server.
    argparse.ArgumentParser(
        prog="python -m api",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args()
    try:
        settings = get_settings()
    except StartupError as exc:
        raise SystemExit(f"python -m api: {exc}") from None
    try:
        check_listening_address(settings.api_host, settings.api_port, workers=settings.api_workers)
    except StartupError as exc:
        raise SystemExit(f"python -m api: {exc}") from None
    log_config = logging_config(settings, service="api")
    logging.config.dictConfig(log_config)
    # Checked here, once, before uvicorn starts its processes: a missing service, database or
    # schema is one line on stderr and a non-zero exit, not a lifespan traceback per process.
    try:
        asyncio.run(preflight.check_services(settings))
    except StartupError as exc:
        raise SystemExit(f"python -m api: {exc}") from None
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        http=BoundedHeadProtocol,
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=10,
        log_config=log_config,
        # One line per request would double the CPU of a flood; /metrics counts requests.
        access_log=settings.log_level == "DEBUG",
    )


def check_listening_address(host: str, port: int, *, workers: int = 1) -> None:
    """Bind API_HOST:API_PORT once, as uvicorn is about to: an address it cannot listen on
    (taken, not this machine's, a name that does not resolve) is one line here, where uvicorn
    would log it in several after the app had started, and exit 3.

    Bound as uvicorn binds it. One process: every address the name resolves to, skipping a
    family this machine cannot make a socket of, IPv6 sockets beside (not over) the IPv4 ones,
    any bind failing the start (uvloop's and asyncio's create_server). Several processes share
    one socket of uvicorn's own: IPv4 unless the host is an IPv6 address (Config.bind_socket)."""
    for family, kind, proto, address in _addresses(host, port, workers):
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks: create_server skips it
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and workers == 1:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except socket.gaierror as exc:
                raise StartupError(_unresolved(host, exc)) from None
            except OSError as exc:
                raise StartupError(_cannot_listen(host, port, exc)) from None


def _addresses(host: str, port: int, workers: int) -> list[tuple[int, int, int, Any]]:
    if workers > 1:  # uvicorn's own socket (Config.bind_socket)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 0, (host, port))]
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(_unresolved(host, exc)) from None
    return [(family, kind, proto, address) for family, kind, proto, _, address in found]


def _unresolved(host: str, exc: socket.gaierror) -> str:
    return (
        f"API_HOST {host!r} is neither an address nor a name that resolves ({exc.strerror}); "
        "set it to an address of this machine, such as 127.0.0.1 or 0.0.0.0"
    )


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: another process listens there; set API_PORT to a free port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: not an address of this machine; set API_HOST to one, or 0.0.0.0"
    if exc.errno == errno.EACCES:
        return f"{where}: a port below 1024 needs privileges; set API_PORT to 1024 or above"
    return f"{where} ({exc.strerror}); check API_HOST and API_PORT"


if __name__ == "__main__":
    main()
