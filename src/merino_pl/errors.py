"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class MerinoError(Exception):
    """Bad user input (a file, a value, a name): reported as one line, exit code 2.

    Raise it with a message that names the bad value (and the file, when there is one) and,
    where it helps, the valid choices. Never raise it for bugs: those should show a traceback.
    """

    exit_code = 2
