"""The one exception type users see for bad input."""


class InputError(ValueError):
    """Bad input from the user: the message names the problem and how to fix it."""
