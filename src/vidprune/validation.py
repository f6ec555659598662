"""Argument checks whose errors name the field, the value given and what is accepted."""

from __future__ import annotations

from typing import Any


def fail(name: str, value: Any, accepted: str) -> None:
    raise ValueError(f"{name}={value!r} is not accepted: {name} must be {accepted}")


def check_fraction(name: str, value: Any) -> None:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, value, "a number")
    if not 0.0 < value <= 1.0:
        fail(name, value, "in (0, 1]")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(name, value, f"an integer >= {minimum}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
