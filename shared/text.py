"""Constrained string types for user input.

JSON can carry strings PostgreSQL cannot store (NUL) or UTF-8 cannot encode (lone surrogates);
rejecting them at the edge turns what would be a database error into a clear 422.
"""

import unicodedata
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, StrictInt


def _printable(value: str, *, allow_newlines: bool) -> str:
    if value.isascii() and value.isprintable():  # no control character, no surrogate
        return value
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs":
            raise ValueError("must be valid Unicode (no lone surrogates)")
        if category == "Cc" and not (allow_newlines and char in "\t\n\r"):
            raise ValueError("must not contain control characters")
    return value


def _single_line(value: str) -> str:
    if value.isascii() and value.isprintable():  # the usual case, without a second call
        return value
    return _printable(value, allow_newlines=False)


KEY_MAX_BYTES = 255


def _field_value(value: str) -> str:
    if len(value) > KEY_MAX_BYTES:  # one character a byte, as read
        raise ValueError(f"must be at most {KEY_MAX_BYTES} bytes")
    if value.isascii() and value.isprintable():  # the usual case
        return value
    # Any byte but the ASCII controls: those of a UTF-8 sequence (0x80-0x9F) read as Latin-1
    # are C1 controls, and no control at all.
    if any(char < " " or char == "\x7f" for char in value):
        raise ValueError("must not contain control characters")
    return value


def _multi_line(value: str) -> str:
    return _printable(value, allow_newlines=True)


# Invisible, but part of what prints: they join emoji sequences (👨‍👩‍👧) and the letters of
# scripts such as Persian.
_JOINERS = str.maketrans("", "", "\u200c\u200d")


def _printable_only(value: str) -> str:
    """Only characters that print: none of the controls, format characters (zero-width space,
    byte-order mark, direction overrides) but the joiners, line or paragraph separators, or
    spaces other than the plain one (str.isprintable)."""
    if value.isprintable():
        return value
    visible = value.translate(_JOINERS)
    if visible and visible.isprintable():
        return value
    _printable(value, allow_newlines=False)  # the clearer message, where it applies
    raise ValueError("must be printable characters only (no format or separator characters)")


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_single_line)]
Venue = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_single_line)]
Description = Annotated[str, Field(max_length=5000), AfterValidator(_multi_line)]
CustomerId = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_single_line)]
# A header's value, its bytes read as Latin-1 (as HTTP reads them): a key written in UTF-8 is
# taken byte for byte, the same key on every retry, and counted in bytes.
IdempotencyKey = Annotated[
    str,
    Field(min_length=1, json_schema_extra={"maxLength": KEY_MAX_BYTES}),
    AfterValidator(_field_value),
]
# A payment provider's reference: it is compared and shown, so nothing in it may be invisible.
PaymentReference = Annotated[
    str, Field(min_length=1, max_length=200), AfterValidator(_printable_only)
]
# As a queued confirmation carries it: what the API accepted before PaymentReference refused
# invisible characters stays readable.
QueuedPaymentReference = Annotated[
    str, Field(min_length=1, max_length=200), AfterValidator(_single_line)
]

# Strict: 2.0, "2" and true are refused rather than silently read as 2 (or 1).
TotalTickets = Annotated[StrictInt, Field(ge=1, le=1_000_000)]
MaxTicketsPerPurchase = Annotated[StrictInt, Field(ge=1, le=100)]
Quantity = Annotated[StrictInt, Field(ge=1, le=100)]
MaxTicketsPerCustomer = Annotated[StrictInt, Field(ge=1, le=10_000)]
HoldSeconds = Annotated[StrictInt, Field(ge=30, le=3_600)]


# The instants this domain stores: a sale, a show, a purchase. Far inside both Python's and
# PostgreSQL's ranges, and away from the edges where asyncpg writes datetime.min and datetime.max
# (in UTC) as PostgreSQL's -infinity and infinity and reads them back naive: such a row would be
# corrupt, not only its JSON.
EARLIEST_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_INSTANT = datetime(2200, 1, 1, tzinfo=UTC)  # exclusive
INSTANT_RANGE = f"from {EARLIEST_INSTANT:%Y-%m-%d} to before {LATEST_INSTANT:%Y-%m-%d} (UTC)"


def within_domain(value: datetime) -> datetime:
    """`value` if it is an instant this domain stores; ValueError otherwise."""
    try:
        in_utc = value.astimezone(UTC)
    except OverflowError:  # an offset pushed it past year 1 or 9999
        raise ValueError(f"must be {INSTANT_RANGE}") from None
    if not EARLIEST_INSTANT <= in_utc < LATEST_INSTANT:
        raise ValueError(f"must be {INSTANT_RANGE}")
    return value


def _iso_text(value: object) -> object:
    # JSON has no datetime type: accept text (or an already-parsed datetime), never a number,
    # which pydantic would otherwise read as a Unix time.
    if isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit():
        raise ValueError("must be an ISO 8601 date-time with a UTC offset, not a number")
    if not isinstance(value, (str, datetime)):
        raise ValueError("must be an ISO 8601 date-time with a UTC offset")
    return value


# An ISO 8601 string with a UTC offset.
Instant = Annotated[AwareDatetime, BeforeValidator(_iso_text), AfterValidator(within_domain)]
