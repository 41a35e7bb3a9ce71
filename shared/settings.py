"""Configuration from environment variables, validated once at start-up.

Every field is documented in README.md ("Configuration"); the defaults run against the local
PostgreSQL and RabbitMQ of a developer machine.
"""

import os
import socket
from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import StartupError

DEV_PURCHASE_ID_SECRET = "dev-only-purchase-id-secret-change-me"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str = "postgresql://postgres@127.0.0.1:5432/ticketing"
    # One AMQP URL, or a comma-separated list with one per node of a RabbitMQ cluster: each
    # process connects to the first that answers, and moves on to the next when it loses it.
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # Replicas of each partition and dead-letter queue when it is created (a cluster smaller
    # than this gives each queue one replica per node).
    quorum_replicas: int = Field(default=3, ge=1, le=99)
    # The management API, read by `python -m worker status` for each partition's leader node:
    # a comma-separated list like RABBITMQ_URL's; empty means port 15672 of each RABBITMQ_URL
    # host, with its user and password.
    rabbitmq_management_url: str = ""
    # Prefix of every exchange and queue name, so several deployments (or test runs) share a broker.
    broker_namespace: str = Field(default="ticketing", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Queues, and units of work a worker leases: fewer fill each message with more purchases
    # (cheaper per purchase everywhere), more let more workers share the load. See README,
    # "Choosing PARTITIONS".
    partitions: int = Field(default=4, ge=1, le=1024)
    queue_max_length: int = Field(default=1_000_000, ge=1)
    delivery_limit: int = Field(default=20, ge=1)

    # How long a starting process waits for PostgreSQL and RabbitMQ to come up before it gives up
    # with one line saying what is missing.
    startup_timeout_s: float = Field(default=30.0, ge=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # json for machines (the default), text for people reading a terminal.
    log_format: Literal["json", "text"] = "json"

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    api_workers: int = Field(default=1, ge=1)
    purchase_id_secret: str = Field(default=DEV_PURCHASE_ID_SECRET, min_length=16)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    publish_timeout_s: float = Field(default=5.0, gt=0)
    # Messages one partition may have in flight at most; the publisher widens towards it only
    # while confirms, not the CPU, hold purchases back (1: always one).
    publish_max_in_flight: int = Field(default=8, ge=1, le=64)
    # How long a partition's sender may hold a message open while purchases keep arriving (0:
    # send at once): under a flood, fewer and fuller messages leave the CPU to requests.
    publish_linger_ms: float = Field(default=1.0, ge=0, le=100)
    # While the API waits on confirms with CPU to spare, a partition's message goes out as soon
    # as it holds this many purchases, instead of at the end of the event loop's turn.
    publish_full_batch: int = Field(default=32, ge=1, le=10_000)
    event_cache_ttl_s: float = Field(default=0.5, ge=0)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # Status requests one API process holds at once (long-poll, server-sent events); past it a
    # long-poll is answered at once and a stream reads its purchase once per heartbeat instead.
    status_max_waiters: int = Field(default=20_000, ge=0)
    # Server-sent events: a comment this often keeps proxies from closing an idle stream; a
    # stream ends after status_stream_max_s (the client reconnects with Last-Event-ID).
    status_heartbeat_s: float = Field(default=15.0, gt=0)
    status_stream_max_s: float = Field(default=300.0, gt=0)
    db_pool_min: int = Field(default=1, ge=1)
    db_pool_max: int = Field(default=10, ge=1)

    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=200)
    batch_size: int = Field(default=500, ge=1, le=10_000)
    batch_max_wait_ms: int = Field(default=20, ge=0)
    lease_ttl_s: float = Field(default=6.0, gt=0)
    # 0 turns the worker's /metrics endpoint off.
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535)

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("is not a postgresql:// URL (postgresql://user@host:port/database)")
        _ = parts.port  # a port that is not a number raises here, not in the driver
        if not parts.path.lstrip("/"):
            raise ValueError("names no database (postgresql://user@host:port/<database>)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        urls = _split(value)
        if not urls:
            raise ValueError("needs at least one amqp:// or amqps:// URL")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("amqp", "amqps"):
                # Not the URL itself: it may hold a password.
                raise ValueError(
                    f"holds a {parts.scheme or 'schemeless'} URL, not amqp:// or amqps://"
                )
            _ = parts.port  # a port that is not a number raises here, not in the client
        return value

    @field_validator("rabbitmq_management_url")
    @classmethod
    def _http_urls(cls, value: str) -> str:
        for url in _split(value):  # empty: derived from RABBITMQ_URL
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # Not the URL itself: it may hold a password.
                raise ValueError(
                    "holds a value that is not an http:// or https:// URL with a host "
                    "(http://user:password@host:15672/)"
                )
            _ = parts.port  # a port that is not a number raises here, not in the client
        return value

    @property
    def rabbitmq_urls(self) -> list[str]:
        """RABBITMQ_URL's nodes, in the order they are tried."""
        return _split(self.rabbitmq_url)

    @property
    def rabbitmq_management_urls(self) -> list[str]:
        if self.rabbitmq_management_url.strip():
            return _split(self.rabbitmq_management_url)
        return [_management_url_of(url) for url in self.rabbitmq_urls]

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # Accept a comma-separated list, the form people type in a shell or a compose file.
        return _split(value) if isinstance(value, str) else value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        # A browser's Origin is scheme://host[:port] and is compared as it is: an entry with a
        # path, a trailing slash or JSON brackets would never match, and CORS would fail silently.
        for origin in value:
            parts = urlsplit(origin)
            if origin != "*" and not (
                parts.scheme and parts.netloc and origin == f"{parts.scheme}://{parts.netloc}"
            ):
                raise ValueError(
                    f"{origin!r} is not an origin: give * or scheme://host[:port] (no path, no "
                    "trailing slash), comma-separated"
                )
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> "Settings":
        if self.db_pool_min > self.db_pool_max:
            raise ValueError(
                f"DB_POOL_MIN ({self.db_pool_min}) is above DB_POOL_MAX ({self.db_pool_max})"
            )
        return self


# Their values are not repeated in an error: they hold passwords and keys.
_UNSHOWN = frozenset(
    {"database_url", "rabbitmq_url", "rabbitmq_management_url", "purchase_id_secret"}
)


def explain(error: ValidationError) -> str:
    """One line naming each environment variable whose value the settings refuse, and why."""
    problems = []
    for item in error.errors():
        reason = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a rule across fields: its message names them
            problems.append(reason)
            continue
        field = str(item["loc"][0])
        shown = (
            ""
            if field in _UNSHOWN or not isinstance(item["input"], str | int | float)
            else f"={item['input']}"
        )
        problems.append(f"{field.upper()}{shown}: {reason[:1].lower()}{reason[1:]}")
    return f"invalid configuration: {'; '.join(problems)}."


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _management_url_of(amqp_url: str) -> str:
    parts = urlsplit(amqp_url)
    scheme = "https" if parts.scheme == "amqps" else "http"
    netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    return f"{scheme}://{netloc}:15672/"


@lru_cache
def get_settings() -> Settings:
    """The settings, once; a bad value raises StartupError naming its variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise StartupError(explain(exc)) from None
