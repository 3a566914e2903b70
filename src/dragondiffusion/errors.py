"""The one exception type users see for bad input."""

from __future__ import annotations

import math
import numbers
import operator


class InputError(ValueError):
    """Bad input from the user: the message names the problem and how to fix it."""


def require_share(name: str, value: float, of: str = "") -> None:
    """Raise InputError unless `value` is a number in [0, 1]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) <= 1.0
    ):
        what = f"a share {of}" if of else "a share"
        raise InputError(f"{name} must lie in [0, 1] ({what}), got {value}")


class SamplingDiverged(InputError):
    """The sampler's latent left the finite numbers: weights too strong for the model (or a
    float16 overflow). Raised at the step where it happened, before anything is decoded."""


def require_whole(name: str, value: object) -> int:
    """`value` as an int: a whole number (Python or NumPy integer, not bool), else InputError."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{name} must be a whole number, got {value!r}") from None


def require_number(name: str, value: object, positive: bool = False) -> float:
    """`value` as a finite float (a real number, not bool or text), > 0 with `positive`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (positive and number <= 0):
        kind = "a positive" if positive else "a finite"
        raise InputError(f"{name} must be {kind} number, got {value!r}")
    return number


def require_point(value: object, what: str) -> tuple[float, float]:
    """`value` as an (x, y) pair of finite numbers, else InputError naming `what`."""
    try:
        x, y = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be an (x, y) pair of numbers, got {value!r}") from None
    return require_number(f"{what} x", x), require_number(f"{what} y", y)
