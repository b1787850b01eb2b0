"""JSON objects PostgreSQL can store: its text and jsonb types cannot hold U+0000, so a string
containing it is refused as invalid input before it reaches the database."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

NUL_REFUSED = "strings must not contain U+0000"


def contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(contains_nul(k) or contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_nul(item) for item in value)
    return False


def _refuse_nul(value: dict[str, Any]) -> dict[str, Any]:
    if contains_nul(value):
        raise ValueError(NUL_REFUSED)
    return value


StorableObject = Annotated[dict[str, Any], AfterValidator(_refuse_nul)]
