"""Constrained string types for user input.

JSON can carry strings PostgreSQL cannot store (NUL) or UTF-8 cannot encode (lone surrogates);
rejecting them at the edge turns what would be a database error into a clear 422.
"""

import unicodedata
from typing import Annotated

from pydantic import AfterValidator, Field, StrictInt


def _printable(value: str, *, allow_newlines: bool) -> str:
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs":
            raise ValueError("must be valid Unicode (no lone surrogates)")
        if category == "Cc" and not (allow_newlines and char in "\t\n\r"):
            raise ValueError("must not contain control characters")
    return value


def _single_line(value: str) -> str:
    return _printable(value, allow_newlines=False)


def _multi_line(value: str) -> str:
    return _printable(value, allow_newlines=True)


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_single_line)]
Venue = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_single_line)]
Description = Annotated[str, Field(max_length=5000), AfterValidator(_multi_line)]
CustomerId = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_single_line)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_single_line)]

# Strict: 2.0, "2" and true are refused rather than silently read as 2 (or 1).
TotalTickets = Annotated[StrictInt, Field(ge=1, le=1_000_000)]
MaxTicketsPerPurchase = Annotated[StrictInt, Field(ge=1, le=100)]
Quantity = Annotated[StrictInt, Field(ge=1, le=100)]
