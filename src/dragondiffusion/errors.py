"""The one exception type users see for bad input."""


class InputError(ValueError):
    """Bad input from the user: the message names the problem and how to fix it."""


def require_share(name: str, value: float, of: str = "") -> None:
    """Raise InputError unless `value` is a number in [0, 1]."""
    if isinstance(value, bool) or not 0.0 <= value <= 1.0:
        what = f"a share {of}" if of else "a share"
        raise InputError(f"{name} must lie in [0, 1] ({what}), got {value}")
