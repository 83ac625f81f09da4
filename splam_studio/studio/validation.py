"""Input checks of the studio: a number from a form field, clamped to its range, each change reported.

A user mistake raises `StudioError` (a ValueError) whose message is meant for the user; `notices` collects what was
clamped or rounded, so the page can say so.
"""
from __future__ import annotations

import math


class StudioError(ValueError):
    """A user mistake or a model that cannot be used; the message says what to do instead."""


def _number(name: str, value) -> float:
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise StudioError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float's range, e.g. 10**400
        digits = len(str(value).strip().lstrip("+-").split(".")[0])
        raise StudioError(f"{name} must be a finite number, got a number of {digits} digits") from None
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(x):
        raise StudioError(f"{name} must be a finite number, got {str(value)[:40]!r}")
    return x


def _clamp(name: str, x, bounds: tuple, notices: list[str]):
    """x clamped to [lo, hi], the change reported in `notices`."""
    lo, hi = bounds
    if lo <= x <= hi:
        return x
    c = min(max(x, lo), hi)
    f = (lambda v: f"{v:g}") if isinstance(x, float) else str  # a large seed stays a whole number
    notices.append(f"{name} {f(x)} is outside {f(lo)}-{f(hi)}; using {f(c)}")
    return c


def clamp_int(name: str, value, bounds: tuple[int, int], notices: list[str]) -> int:
    """An integer in [lo, hi]: rounded and clamped, each change reported in `notices`."""
    x = _number(name, value)
    n = int(round(x))
    if n != x:
        notices.append(f"{name} {value!r} rounded to {n}")
    return _clamp(name, n, bounds, notices)


def clamp_float(name: str, value, bounds: tuple[float, float], notices: list[str]) -> float:
    """A number in [lo, hi], clamped, the change reported in `notices`."""
    return _clamp(name, _number(name, value), bounds, notices)
