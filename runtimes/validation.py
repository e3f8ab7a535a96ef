"""Argument checks shared by the encode API, so every option is judged the same way."""

from __future__ import annotations

import math
import numbers

import numpy as np


def require_int(name: str, value, minimum: int) -> int:
    """``value`` as a Python int if it is an integer (numpy ones included, bool excluded) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def require_bool(name: str, value, allow_none: bool = False) -> bool | None:
    """``value`` as a Python bool if it is a bool (numpy's included), or None where ``allow_none``.

    Truthiness is not enough: ``truncate="no"`` is a true string, and taking it as True would do the
    opposite of what was asked.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        expected = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return bool(value)


def require_positive_real(name: str, value) -> float:
    """``value`` as a Python float if it is a finite real number > 0 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
