"""Purchase ids that prove they were issued, without any stored state.

The API writes nothing to PostgreSQL on the purchase path, yet `GET /purchases/{id}` must tell
"pending" (issued, not yet decided) from "never issued" (404). So an id is a UUID (version 8)
that carries an HMAC tag under PURCHASE_ID_SECRET, shared by every API replica:

    bytes 0..11   nonce: random, or derived from an Idempotency-Key; the version nibble (byte 6)
                  and the RFC 9562 variant bits (byte 8) set                -> 90 random bits
    bytes 12..15  keyed BLAKE2b(nonce)[:4], keyed by PURCHASE_ID_SECRET       -> 32-bit tag

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
import os
import weakref
from uuid import UUID, SafeUUID

NONCE_BYTES = 12
TAG_BYTES = 4
RANDOM_BITS = NONCE_BYTES * 8 - 4 - 2  # less the version nibble and the variant bits

# Random ids are issued this many at a time, from one draw of the OS's CSPRNG: one getrandom()
# system call per purchase was a visible share of the accept path's CPU on a virtual machine,
# and the calls that made one id out of one nonce cost each purchase another tenth of its app's
# share.
IDS_PER_DRAW = 256
# The bits of a nonce (bytes 0..11, as an integer) that are kept, and those that are set: the
# version nibble (byte 6) to 8, the RFC 9562 variant (the top two bits of byte 8) to 0b10.
_NONCE_MASK = ((1 << NONCE_BYTES * 8) - 1) & ~(0xF0 << 8 * 5) & ~(0xC0 << 8 * 3)
_NONCE_BITS = (0x80 << 8 * 5) | (0x80 << 8 * 3)

# A forked child must never issue the ids its parent drew (uvicorn spawns its workers, but a
# server that forks would otherwise hand the same ids out twice).
_ISSUERS: "weakref.WeakSet[PurchaseIds]" = weakref.WeakSet()


def _forget_drawn() -> None:
    for ids in _ISSUERS:
        ids._drawn.clear()


os.register_at_fork(after_in_child=_forget_drawn)

_V2 = b"purchase-id-v2"  # BLAKE2b personalisations: at most 16 bytes
_IDEMPOTENCY_V2 = b"idempotency-v2"
_V1 = b"purchase-id\x00"  # the first layout's HMAC prefixes
_IDEMPOTENCY = b"idempotency\x00"


class PurchaseIds:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()
        # BLAKE2b is a MAC when keyed, a third the cost of HMAC-SHA256, and takes keys of up to
        # 64 bytes: the secret, whatever its length, is hashed down to 32.
        self._blake_key = hashlib.sha256(b"purchase-id-key\x00" + self._key).digest()
        # Keyed once: a copy of this state tags a nonce without hashing the key again.
        self._tagger = hashlib.blake2b(key=self._blake_key, digest_size=TAG_BYTES, person=_V2)
        self._drawn: list[UUID] = []  # random ids issued next, last first
        _ISSUERS.add(self)

    def new(self) -> UUID:
        drawn = self._drawn
        if not drawn:
            randomness = os.urandom(NONCE_BYTES * IDS_PER_DRAW)
            seal = self._seal
            drawn += [
                seal(randomness[i : i + NONCE_BYTES])
                for i in range(0, len(randomness), NONCE_BYTES)
            ]
        return drawn.pop()

    def for_idempotency_key(self, *, event_id: UUID, customer_id: str, key: str) -> UUID:
        """The same (event, customer, key) always gives the same id, so a retried POST is one
        purchase: the worker applies an id once."""
        derived = hashlib.blake2b(
            _idempotency_material(event_id, customer_id, key),
            key=self._blake_key,
            digest_size=NONCE_BYTES,
            person=_IDEMPOTENCY_V2,
        )
        return self._seal(derived.digest())

    def first_layout_for_idempotency_key(
        self, *, event_id: UUID, customer_id: str, key: str
    ) -> UUID:
        """The id the first layout derived for this key: a retry across the upgrade looks for
        it before buying again."""
        material = _idempotency_material(event_id, customer_id, key)
        head = bytearray(hmac.digest(self._key, _IDEMPOTENCY + material, hashlib.sha256)[:8])
        head[6] = (head[6] & 0x0F) | 0x80
        return UUID(bytes=bytes(head) + self._first_layout_tag(bytes(head)))

    def is_issued(self, purchase_id: UUID) -> bool:
        raw = purchase_id.bytes
        return hmac.compare_digest(self._tag(raw[:NONCE_BYTES]), raw[NONCE_BYTES:]) or (
            hmac.compare_digest(self._first_layout_tag(raw[:8]), raw[8:])
        )

    def _seal(self, nonce: bytes) -> UUID:
        """The id of a nonce: its version and variant bits set, and its tag appended."""
        head = int.from_bytes(nonce) & _NONCE_MASK | _NONCE_BITS
        tag = self._tag(head.to_bytes(NONCE_BYTES))
        return uuid_of(head << TAG_BYTES * 8 | int.from_bytes(tag))

    def _tag(self, head: bytes) -> bytes:
        mac = self._tagger.copy()
        mac.update(head)
        return mac.digest()

    def _first_layout_tag(self, head: bytes) -> bytes:
        tag = bytearray(hmac.digest(self._key, _V1 + head, hashlib.sha256)[:8])
        tag[0] = (tag[0] & 0x3F) | 0x80
        return bytes(tag)


def uuid_of(value: int) -> UUID:
    """UUID(int=value) for a value known to be 128 bits, at half the cost: without
    UUID.__init__'s checks of its arguments, which cost more than the rest of issuing an id. It
    sets what __init__ sets, as CPython 3.14's own UUID._from_int does."""
    uuid = _new_object(UUID)
    _set_attribute(uuid, "int", value)
    _set_attribute(uuid, "is_safe", _SAFETY_UNKNOWN)
    return uuid


# Looked up once: a lookup of SafeUUID.unknown goes through the enum's metaclass each time.
_new_object = object.__new__
_set_attribute = object.__setattr__
_SAFETY_UNKNOWN = SafeUUID.unknown


def _idempotency_material(event_id: UUID, customer_id: str, key: str) -> bytes:
    # The customer's length first, so ("ab", "c") and ("a", "bc") never derive the same id.
    customer = customer_id.encode()
    return b"".join((event_id.bytes, len(customer).to_bytes(4, "big"), customer, key.encode()))
