"""Argument checks shared by the encode API, so every integer option is judged the same way."""

from __future__ import annotations

import numbers


def require_int(name: str, value, minimum: int) -> int:
    """``value`` as a Python int if it is an integer (numpy ones included, bool excluded) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
