"""Purchase ids that prove they were issued, without any stored state.

The API writes nothing to PostgreSQL on the purchase path, yet `GET /purchases/{id}` must tell
"pending" (issued, not yet decided) from "never issued" (404). So an id is a UUID (version 8)
whose second half is an HMAC of its first half under PURCHASE_ID_SECRET, shared by every API
replica:

    bytes 0..7   nonce (random, or derived from an Idempotency-Key), version nibble set
    bytes 8..15  HMAC-SHA256(secret, nonce)[:8], variant bits set  -> 62-bit tag
"""

import hashlib
import hmac
import secrets
from uuid import UUID


class PurchaseIds:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def new(self) -> UUID:
        return self._seal(secrets.token_bytes(8))

    def for_idempotency_key(self, *, event_id: UUID, customer_id: str, key: str) -> UUID:
        """The same (event, customer, key) always gives the same id, so a retried POST is one
        purchase: the worker applies an id once."""
        customer = customer_id.encode()
        material = b"".join(
            (
                b"idempotency\x00",
                event_id.bytes,
                len(customer).to_bytes(4, "big"),
                customer,
                key.encode(),
            )
        )
        return self._seal(hmac.digest(self._key, material, hashlib.sha256)[:8])

    def is_issued(self, purchase_id: UUID) -> bool:
        raw = purchase_id.bytes
        return hmac.compare_digest(self._tag(raw[:8]), raw[8:])

    def _seal(self, nonce: bytes) -> UUID:
        head = bytearray(nonce)
        head[6] = (head[6] & 0x0F) | 0x80  # version 8: "custom" layout
        return UUID(bytes=bytes(head) + self._tag(bytes(head)))

    def _tag(self, head: bytes) -> bytes:
        tag = bytearray(hmac.digest(self._key, b"purchase-id\x00" + head, hashlib.sha256)[:8])
        tag[0] = (tag[0] & 0x3F) | 0x80  # RFC 9562 variant
        return bytes(tag)
