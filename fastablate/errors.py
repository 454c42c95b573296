"""The one exception type for bad input; the CLI prints its message as one line, exit 2."""


class FastablateError(ValueError):
    """Bad input from the user: an unknown name, a missing path, a mismatched checkpoint.

    The message is one line that names the bad value and what would be valid.
    """
