"""Argument checks whose errors name the field, the value given and what is accepted."""

from __future__ import annotations

import math
from typing import Any


def fail(name: str, value: Any, accepted: str) -> None:
    raise ValueError(f"{name}={value!r} is not accepted: {name} must be {accepted}")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (True is an int to Python, never a number here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_number(name: str, value: Any, low: float, high: float = math.inf) -> None:
    """A finite number in [low, high]."""
    if not is_number(value):
        fail(name, value, "a finite number")
    if not low <= value <= high:
        fail(name, value, f"in [{low}, {high}]" if high < math.inf else f">= {low}")


def check_fraction(name: str, value: Any) -> None:
    """A finite number in (0, 1]."""
    if not is_number(value):
        fail(name, value, "a finite number")
    if not 0.0 < value <= 1.0:
        fail(name, value, "in (0, 1]")


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        fail(name, value, f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else ""))


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(name, value, "True or False")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
