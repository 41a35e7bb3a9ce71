"""`python -m api`: serve the API with uvicorn on API_HOST:API_PORT."""

import uvicorn

from shared.logs import logging_config
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=10,
        log_config=logging_config(settings, service="api"),
        # One line per request would double the CPU of a flood; /metrics counts requests.
        access_log=settings.log_level == "DEBUG",
    )


if __name__ == "__main__":
    main()
