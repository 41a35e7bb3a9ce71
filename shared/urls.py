"""The parts of the service URLs we name in logs and messages (never their passwords)."""

from urllib.parse import unquote, urlsplit

# The port a URL that names none means, by scheme (AMQP's 5672 for any other).
_DEFAULT_PORTS = {"amqps": 5671, "postgresql": 5432, "postgres": 5432}


def host_port(url: str) -> tuple[str, int]:
    """The host and port a URL connects to, its scheme's default port when it names none."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS.get(parts.scheme, 5672)


def where(url: str) -> str:
    """host:port of a URL (never its password), for logs and messages."""
    host, port = host_port(url)
    return f"{host}:{port}"


def vhost(amqp_url: str) -> str:
    """The virtual host an AMQP URL names, as the client reads it ("/" when none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"
