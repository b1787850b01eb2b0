"""JSON objects the core can store, publish and return: what PostgreSQL's jsonb and orjson both take.

The HTTP body parser (Python's json) accepts more than that, and a value it accepts but jsonb or
orjson does not would fail after the request was taken (or, stored, fail every later publish):
U+0000 (jsonb and text cannot hold it), lone surrogates (not UTF-8), integers beyond 64 bits
(orjson refuses them) and NaN/Infinity (not JSON; orjson would silently turn them into null).
Such values are refused as invalid input, naming where they are.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BeforeValidator, Field
from typing_extensions import TypeAliasType

NUL_REFUSED = "strings must not contain U+0000"
# orjson's range: signed 64-bit below zero, unsigned 64-bit above.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
# Fractions (and numbers written as such, 1e19) within this, exactly representable as a double:
# a bound near 2**64 is not, and validators comparing in doubles then disagree at its edge.
FRACTION_MAX = 1e19
_SURROGATE = re.compile("[\ud800-\udfff]")


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return NUL_REFUSED
    if _SURROGATE.search(value):
        return "strings must not contain lone surrogates (U+D800-U+DFFF)"
    return None


def printable(key: Any) -> str:
    # A location must itself be storable and short: the key may be the very value refused.
    text = str(key).encode("ascii", "backslashreplace").decode().replace("\x00", "\\x00")
    return text if len(text) <= 40 else text[:37] + "..."


def unstorable(value: Any, where: str = "") -> str | None:
    """What makes `value` unstorable, with its location (`a.b[2]`), or None if it is fine."""
    problem: str | None = None
    if isinstance(value, str):
        problem = _string_problem(value)
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            problem = f"integers must be within [{INT_MIN}, {INT_MAX}]"
    elif isinstance(value, float):
        if not math.isfinite(value):
            problem = "numbers must be finite (no NaN or Infinity)"
        elif not -FRACTION_MAX <= value <= FRACTION_MAX:
            problem = f"numbers that are not integers must be within +-{FRACTION_MAX:.0e}"
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{printable(key)}" if where else printable(key)
            found = unstorable(key, where or "key") if isinstance(key, str) else None
            if found is None:
                found = unstorable(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if (found := unstorable(item, f"{where}[{index}]")) is not None:
                return found
    if problem is None:
        return None
    return f"{where}: {problem}" if where else problem


def _refuse_unstorable(value: Any) -> Any:
    if (problem := unstorable(value)) is not None:
        raise ValueError(problem)
    return value


def _only_floats(value: Any) -> Any:
    # An integer is never turned into a float here: beyond 64 bits it is refused, not rounded.
    if not isinstance(value, float):
        raise ValueError("not a fractional number")
    return value


# The recursive type documents in the OpenAPI what is taken (integers in orjson's range, other
# numbers finite and within +-1e19); `unstorable` checks it first, with what JSON Schema does not
# say (no U+0000, no lone surrogates), and names where the problem is.
if TYPE_CHECKING:
    StorableValue = Any
else:
    StorableValue = TypeAliasType(
        "StorableValue",
        Union[  # noqa: UP007 (a recursive alias needs the Union form)
            Annotated[int, Field(strict=True, ge=INT_MIN, le=INT_MAX)],
            Annotated[
                float,
                BeforeValidator(_only_floats),
                Field(allow_inf_nan=False, ge=-FRACTION_MAX, le=FRACTION_MAX),
            ],
            str,
            bool,
            list["StorableValue"],
            dict[str, "StorableValue"],
            None,
        ],
    )
# Checked before the type: one clear message (where, and what), not one per branch of the union.
StorableObject = Annotated[dict[str, StorableValue], BeforeValidator(_refuse_unstorable)]
