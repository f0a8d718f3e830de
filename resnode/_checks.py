"""Argument checks shared by the library: every bad argument raises ``ValueError`` naming it."""

from __future__ import annotations

import operator
from collections.abc import Iterable


def positive_int(name: str, value) -> int:
    """Return ``value`` as an int if it is an integer >= 1 (Python's or numpy's), else raise ``ValueError``."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or isinstance(value, float):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    """Return ``value`` as a float if it is a finite number > 0 (not a bool), else raise ``ValueError``."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def nonnegative_float(name: str, value) -> float:
    """Return ``value`` as a float if it is a finite number >= 0 (not a bool), else raise ``ValueError``."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}") from None
    if not 0 <= number < float("inf"):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return number


def same_dtype(**tensors) -> None:
    """Raise ``TypeError`` listing the dtypes unless every tensor given by name has the same one (torch's own error
    for mixed float32/float64 names no argument)."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{', '.join(dtypes)} must share one dtype; got {dtypes}")


def one_of(name: str, value, allowed: Iterable):
    """Return ``value`` if it is in ``allowed``, else raise ``ValueError`` listing the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value
