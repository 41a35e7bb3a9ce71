"""Which cluster node leads each quorum queue, read from RabbitMQ's management API (AMQP does
not say): what `python -m worker status` shows, so an operator sees the leaders spread."""

import asyncio
import base64
import json
import logging
from urllib.error import URLError
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from urllib.request import Request, urlopen

from shared.settings import Settings
from shared.urls import vhost

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0


async def queue_leaders(settings: Settings) -> dict[str, str] | None:
    """Queue name -> leader node for every queue of RABBITMQ_URL's virtual host, from the first
    management API that answers; None when none does (plugin off, port closed)."""
    virtual_host = vhost(settings.rabbitmq_urls[0])
    for url in settings.rabbitmq_management_urls:
        try:
            return await asyncio.to_thread(_fetch, url, virtual_host)
        except (OSError, URLError, ValueError) as exc:
            log.debug("management API at %s: %r", public_address(url), exc)
    return None


def _fetch(base_url: str, vhost: str) -> dict[str, str]:
    parts = urlsplit(base_url)
    path = f"{parts.path.rstrip('/')}/api/queues/{quote(vhost, safe='')}"
    url = urlunsplit((parts.scheme, _host_port(parts.netloc), path, "columns=name,leader,type", ""))
    request = Request(url, headers={"Accept": "application/json"})
    if parts.username is not None:
        user_password = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = base64.b64encode(user_password.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urlopen(request, timeout=TIMEOUT_S) as response:
        queues = json.loads(response.read())
    return {q["name"]: q["leader"] for q in queues if q.get("leader")}


def _host_port(netloc: str) -> str:
    return netloc.rsplit("@", 1)[-1]


def public_address(url: str) -> str:
    """A management URL without its credentials."""
    return _host_port(urlsplit(url).netloc)
