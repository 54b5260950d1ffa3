"""The one exception type the CLI turns into a one-line message and exit code 2, and the
argparse parser whose usage errors are one line too."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class MerinoError(Exception):
    """Bad user input (a file, a value, a name): reported as one line, exit code 2.

    Raise it with a message that names the bad value (and the file, when there is one) and,
    where it helps, the valid choices. Never raise it for bugs: those should show a traceback.
    """

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and still exit code 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def parse_problems(
    add_arguments: Callable[[argparse.ArgumentParser], None], argv: Sequence[str], prog: str
) -> tuple[argparse.Namespace | None, list[str]]:
    """Parse ``argv`` with a stage's own ``add_arguments`` without exiting: (args, []) or
    (None, [the usage error]). How ``pipeline`` checks a stage's arguments before running it."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise MerinoError(f"{prog}: {message}")

    parser = _Parser(prog=prog, add_help=False)
    add_arguments(parser)
    try:
        return parser.parse_args(list(argv)), []
    except MerinoError as e:
        return None, [str(e)]
