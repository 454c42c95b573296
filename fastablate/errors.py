"""The one exception type for bad input (the CLI prints its message as one line, exit 2),
and notes: one line on stderr about something a user should know but need not fix."""
import os
import sys


class FastablateError(ValueError):
    """Bad input from the user: an unknown name, a missing path, a mismatched checkpoint.

    The message is one line that names the bad value and what would be valid.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line errors."""
    return str(e).splitlines()[0] if str(e) else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is: what Ctrl-C does, run directories marked failed."""


def note(message: str) -> None:
    """One line ``note: ...`` on stderr (under torchrun, from process 0 alone: the others say the same)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr)
