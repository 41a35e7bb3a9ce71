"""The service URLs as logs and messages name them."""

import pytest

from shared.urls import host_port, vhost, where


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqps://u:secret@rabbit/shop", "rabbit:5671"),  # TLS without a port: AMQPS's own
        ("amqp://u:secret@rabbit/shop", "rabbit:5672"),
        ("amqps://u:secret@rabbit:5700/", "rabbit:5700"),
        ("postgresql://u:secret@db/ticketing", "db:5432"),
        ("amqp:///", "127.0.0.1:5672"),
    ],
)
def test_where_names_host_and_port_with_the_schemes_default_and_never_the_password(
    url: str, expected: str
) -> None:
    assert where(url) == expected
    assert where(url) == "{}:{}".format(*host_port(url))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://rabbit", "/"),
        ("amqp://rabbit/", "/"),
        ("amqp://rabbit/%2F", "/"),
        ("amqp://r/a%20b", "a b"),
    ],
)
def test_vhost_is_the_virtual_host_the_url_names_and_slash_when_none(
    url: str, expected: str
) -> None:
    assert vhost(url) == expected
