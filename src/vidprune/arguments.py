"""A call's arguments by parameter name (the runtime's hooks and the adapters' hooks read them so)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


@functools.lru_cache(maxsize=None)
def _parameters(function: Callable) -> list[str]:
    names = list(inspect.signature(function).parameters)
    return names[1:] if names and names[0] == "self" else names


def bind_arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a call of `function` (an unbound method) by parameter name."""
    named = dict(zip(_parameters(function), args))
    named.update(kwargs)
    return named
