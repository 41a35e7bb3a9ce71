"""`python -m api`: serve the API with uvicorn on API_HOST:API_PORT.

It takes no arguments: everything is set by environment variables (or a .env file), listed in
README.md, "Configuration". It checks PostgreSQL, the schema and RabbitMQ first, and exits with
one line saying what is missing.
"""

import argparse
import asyncio
import logging.config

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


if __name__ == "__main__":
    main()
