"""Purchase ids that prove they were issued, without any stored state.

The API writes nothing to PostgreSQL on the purchase path, yet `GET /purchases/{id}` must tell
"pending" (issued, not yet decided) from "never issued" (404). So an id is a UUID (version 8)
that carries an HMAC tag under PURCHASE_ID_SECRET, shared by every API replica:

    bytes 0..11   nonce: random, or derived from an Idempotency-Key; the version nibble (byte 6)
                  and the RFC 9562 variant bits (byte 8) set                -> 90 random bits
    bytes 12..15  HMAC-SHA256(secret, "purchase-id-v2" + nonce)[:4]           -> 32-bit tag

Why 90 random bits: the worker deduplicates by id, so two purchases that drew the same id would
be one purchase (the second skipped as "already decided", its owner shown the other's status).
Among n ids of b random bits, the chance that any two collide is about 1 - exp(-n^2 / 2^(b+1)):

    n = 10^9 ids,  b = 60 (the first layout)  ->  0.35
    n = 10^9 ids,  b = 90                     ->  4.0e-10
    n = 10^12 ids, b = 90                     ->  4.0e-4

The tag only has to tell "never issued" from "pending": a made-up id passes it with probability
2^-32, and then reads as pending, which costs nothing.

Ids of the first layout (a 60-bit nonce in bytes 0..7, a 62-bit tag in bytes 8..15) are still
recognised, so purchases accepted before an upgrade keep answering while they are polled, and a
retried Idempotency-Key finds its first-layout purchase if that was already recorded.
"""

import hashlib
import hmac
import secrets
from uuid import UUID

NONCE_BYTES = 12
TAG_BYTES = 4
RANDOM_BITS = NONCE_BYTES * 8 - 4 - 2  # less the version nibble and the variant bits

_V2 = b"purchase-id-v2\x00"
_V1 = b"purchase-id\x00"
_IDEMPOTENCY = b"idempotency\x00"


class PurchaseIds:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def new(self) -> UUID:
        return self._seal(secrets.token_bytes(NONCE_BYTES))

    def for_idempotency_key(self, *, event_id: UUID, customer_id: str, key: str) -> UUID:
        """The same (event, customer, key) always gives the same id, so a retried POST is one
        purchase: the worker applies an id once."""
        return self._seal(self._derive(event_id, customer_id, key)[:NONCE_BYTES])

    def first_layout_for_idempotency_key(
        self, *, event_id: UUID, customer_id: str, key: str
    ) -> UUID:
        """The id the first layout derived for this key: a retry across the upgrade looks for
        it before buying again."""
        head = bytearray(self._derive(event_id, customer_id, key)[:8])
        head[6] = (head[6] & 0x0F) | 0x80
        return UUID(bytes=bytes(head) + self._first_layout_tag(bytes(head)))

    def is_issued(self, purchase_id: UUID) -> bool:
        raw = purchase_id.bytes
        return hmac.compare_digest(self._tag(raw[:NONCE_BYTES]), raw[NONCE_BYTES:]) or (
            hmac.compare_digest(self._first_layout_tag(raw[:8]), raw[8:])
        )

    def _derive(self, event_id: UUID, customer_id: str, key: str) -> bytes:
        customer = customer_id.encode()
        material = b"".join(
            (_IDEMPOTENCY, event_id.bytes, len(customer).to_bytes(4, "big"), customer, key.encode())
        )
        return hmac.digest(self._key, material, hashlib.sha256)

    def _seal(self, nonce: bytes) -> UUID:
        head = bytearray(nonce)
        head[6] = (head[6] & 0x0F) | 0x80  # version 8: "custom" layout
        head[8] = (head[8] & 0x3F) | 0x80  # RFC 9562 variant
        return UUID(bytes=bytes(head) + self._tag(bytes(head)))

    def _tag(self, head: bytes) -> bytes:
        return hmac.digest(self._key, _V2 + head, hashlib.sha256)[:TAG_BYTES]

    def _first_layout_tag(self, head: bytes) -> bytes:
        tag = bytearray(hmac.digest(self._key, _V1 + head, hashlib.sha256)[:8])
        tag[0] = (tag[0] & 0x3F) | 0x80
        return bytes(tag)
