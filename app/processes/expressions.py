"""Conditions of decision steps and triggers: Google's Common Expression Language (cel-python),
never `eval`. A CEL expression reads only the variables it is given and cannot call Python."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import celpy
from celpy import adapter, celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

_ENVIRONMENT = celpy.Environment()


class ExpressionError(ValueError):
    """An expression that does not parse."""


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> celpy.Runner:
    """The runnable form of `expression` (cached: a definition's conditions compile once)."""
    try:
        return _ENVIRONMENT.program(_ENVIRONMENT.compile(expression))
    except CELParseError as exc:
        raise ExpressionError(f"{expression!r} is not a valid CEL expression: {str(exc).splitlines()[0]}") from exc


def holds(expression: str, variables: Mapping[str, Any]) -> bool:
    """Whether `expression` is true for `variables` (JSON values). An expression that fails on
    these values (a missing field, a type mismatch) or gives no boolean does not hold;
    `has(state.x)` tests for a field."""
    runner = compile_expression(expression)
    activation = {name: adapter.json_to_cel(value) for name, value in variables.items()}
    try:
        result = runner.evaluate(activation)
    except (CELEvalError, TypeError, ValueError):
        return False
    return isinstance(result, celtypes.BoolType) and bool(result)
