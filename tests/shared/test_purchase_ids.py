"""Purchase ids: 90 random bits, a tag that tells issued from never issued, and ids of the first
layout still recognised across the upgrade."""

import copy
import hashlib
import hmac
import math
import os
import pickle
import secrets
from uuid import UUID, uuid4

import asyncpg
import httpx

from shared.purchases.ids import IDS_PER_DRAW, RANDOM_BITS, PurchaseIds, uuid_of
from shared.settings import Settings
from tests.factories import create_event, purchase

IDS = PurchaseIds("a-secret-of-sixteen-chars")


def first_layout_id(secret: str, nonce: bytes) -> UUID:
    """An id as the first layout issued it (60-bit nonce, 62-bit tag), written out independently
    of the module under test."""
    head = bytearray(nonce)
    head[6] = (head[6] & 0x0F) | 0x80
    tag = bytearray(hmac.digest(secret.encode(), b"purchase-id\x00" + head, hashlib.sha256)[:8])
    tag[0] = (tag[0] & 0x3F) | 0x80
    return UUID(bytes=bytes(head) + bytes(tag))


def test_new_ids_have_at_least_90_random_bits() -> None:
    ids = [IDS.new().int for _ in range(5_000)]
    always_set, always_clear = (1 << 128) - 1, 0
    for value in ids:
        always_set &= value
        always_clear |= value
    # A bit that took both values over 5,000 draws is random (a fixed one never does; a random
    # one stays fixed with probability 2^-4999). The tag's 32 bits vary too: leave them out.
    varying = (always_clear & ~always_set) >> 32
    assert RANDOM_BITS >= 90
    assert bin(varying).count("1") == RANDOM_BITS


def test_a_forked_child_never_issues_the_ids_its_parent_drew() -> None:
    """Ids are drawn many at a time: a child forked with some drawn must draw its own."""
    ids = PurchaseIds("a-secret-of-sixteen-chars")
    ids.new()  # the rest of its draw is issued next
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.write(write, ids.new().bytes)
        os._exit(0)
    os.waitpid(child, 0)
    childs = UUID(bytes=os.read(read, 16))
    os.close(read)
    os.close(write)

    assert ids.is_issued(childs)
    assert childs not in {ids.new() for _ in range(IDS_PER_DRAW)}


def test_a_billion_ids_collide_with_a_chance_below_one_in_a_billion() -> None:
    n = 10**9
    assert -math.expm1(-(n**2) / 2 ** (RANDOM_BITS + 1)) < 1e-9


def test_new_ids_are_rfc_9562_version_8_and_issued() -> None:
    for _ in range(100):
        purchase_id = IDS.new()
        assert purchase_id.version == 8
        assert purchase_id.variant == "specified in RFC 4122"
        assert IDS.is_issued(purchase_id)


def test_ids_built_without_uuid_init_are_like_any_other_uuid() -> None:
    for value in (0, 1, (1 << 128) - 1, IDS.new().int, uuid4().int):
        built, usual = uuid_of(value), UUID(int=value)
        assert type(built) is UUID
        assert built == usual
        assert hash(built) == hash(usual)
        assert (str(built), repr(built), built.bytes, built.hex) == (
            str(usual),
            repr(usual),
            usual.bytes,
            usual.hex,
        )
        assert built.is_safe == usual.is_safe
        assert pickle.loads(pickle.dumps(built)) == usual
        assert copy.deepcopy(built) == usual
        assert {built: 1}[usual] == 1


def test_ids_never_issued_are_told_apart() -> None:
    # A made-up id passes the tag with probability 2^-32 (and 2^-62 for the first layout).
    assert not any(IDS.is_issued(uuid4()) for _ in range(2_000))
    assert not IDS.is_issued(PurchaseIds("another-secret-sixteen").new())
    issued = IDS.new()
    for bit in range(128):
        if bit in (76, 77, 78, 79, 62, 63):  # version and variant bits: fixed
            continue
        assert not IDS.is_issued(UUID(int=issued.int ^ (1 << bit))), bit


def test_an_idempotency_key_always_gives_the_same_issued_id() -> None:
    event = uuid4()
    first = IDS.for_idempotency_key(event_id=event, customer_id="c", key="k")
    assert first == IDS.for_idempotency_key(event_id=event, customer_id="c", key="k")
    assert IDS.is_issued(first)
    others = {
        IDS.for_idempotency_key(event_id=uuid4(), customer_id="c", key="k"),
        IDS.for_idempotency_key(event_id=event, customer_id="d", key="k"),
        IDS.for_idempotency_key(event_id=event, customer_id="c", key="l"),
        # The length prefix keeps the customer and the key apart.
        IDS.for_idempotency_key(event_id=event, customer_id="ck", key=""),
    }
    assert first not in others
    assert len(others) == 4


def test_ids_of_the_first_layout_are_still_recognised() -> None:
    secret = "a-secret-of-sixteen-chars"
    for _ in range(100):
        old = first_layout_id(secret, secrets.token_bytes(8))
        assert IDS.is_issued(old)
    assert not IDS.is_issued(first_layout_id("another-secret-sixteen", secrets.token_bytes(8)))


async def test_a_retry_after_the_upgrade_finds_its_first_layout_purchase(
    api: httpx.AsyncClient, db: asyncpg.Pool, settings: Settings
) -> None:
    """A purchase recorded under the first layout's id for a key: retrying the key now answers
    that id again (and buys nothing more)."""
    event = await create_event(api, total_tickets=5)
    ids = PurchaseIds(settings.purchase_id_secret)
    old = ids.first_layout_for_idempotency_key(
        event_id=UUID(event["id"]), customer_id="alice", key="checkout-1"
    )
    await db.execute(
        "INSERT INTO purchases (id, event_id, customer_id, quantity, status) "
        "VALUES ($1, $2, 'alice', 2, 'confirmed')",
        old,
        UUID(event["id"]),
    )

    retry = await purchase(
        api, event["id"], customer_id="alice", quantity=2, idempotency_key="checkout-1"
    )

    assert retry.status_code == 202, retry.text
    assert retry.json()["purchase_id"] == str(old)
    status = await api.get(f"/purchases/{old}")
    assert status.json()["status"] == "confirmed"
