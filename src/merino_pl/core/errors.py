"""The one exception type the CLI turns into a one-line message and exit code 2, and the
argparse parser whose usage errors are one line too."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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


# What libraries say when the disk fills under them without an OSError: torch.save's zip writer
# ("PytorchStreamWriter failed writing file ...: file write failed", "unexpected pos 39104 vs 38998").
_WRITE_FAILED = ("file write failed", "unexpected pos")


def disk_full(
    exc: BaseException, path: str | os.PathLike | None = None, near: Sequence[str | os.PathLike] = ()
) -> MerinoError | None:
    """The one-line error for a write that failed because its file system is full, or None when
    ``exc`` is something else. Follows the exception chain (libraries wrap the OSError).

    ``path``: the file being written, when the caller knows it. A library's write often names no
    file (a logger's ``OSError`` without ``filename``, torch's "file write failed"): then the first
    of ``near`` (folders the write may have gone to, e.g. a run's folder) and the working directory
    whose file system is (almost) full is named, and a library's write failure on a file system
    with room is not taken for a full disk."""
    seen: BaseException | None = exc
    for _ in range(20):  # a chain, never a cycle, but bounded all the same
        if seen is None:
            return None
        text = str(seen).lower()
        named = getattr(seen, "filename", None) or path
        enospc = getattr(seen, "errno", None) == errno.ENOSPC or "no space left on device" in text
        if enospc or any(w in text for w in _WRITE_FAILED):
            where = named if named is not None else _full_one([*near, "."])
            if enospc or (where is not None and _free_bytes(where) < _LOW):
                break  # ENOSPC, or a library's write failure on an (almost) full disk
        seen = seen.__cause__ or seen.__context__
    else:
        return None
    if where is None:
        return MerinoError(
            f"no space left on device ({str(seen).splitlines()[0][:200] if str(seen) else 'a write failed'})"
        )
    if named is None and os.path.isdir(where):  # a folder the write went to, not the file
        return MerinoError(f"no space left on {mount_point(where)} writing in {os.path.abspath(where)}")
    return MerinoError(f"no space left on {mount_point(where)} writing {where}")


_LOW = 64 << 20  # bytes free below which a file system counts as full (a failed write left the rest)


def _full_one(folders: Sequence[str | os.PathLike]) -> Path | None:
    """The first of ``folders`` (its nearest existing one) on an (almost) full file system, else None."""
    for folder in folders:
        p = Path(os.path.abspath(folder))
        while not p.exists() and p != p.parent:
            p = p.parent
        if _free_bytes(p) < _LOW:
            return p
    return None


def not_permitted(exc: BaseException) -> MerinoError | None:
    """The one-line error for a file the operating system would not let us create, write or read
    (a read-only folder, ``chattr +i``, a read-only mount: ``EACCES``, ``EPERM``, ``EROFS``),
    naming the file; None when ``exc`` (or what it wraps) is something else."""
    seen: BaseException | None = exc
    for _ in range(20):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _DENIED and seen.filename is not None:
            where = seen.filename
            if Path(str(where)).name.startswith("."):  # a temp file beside the output: name its folder
                where = os.path.dirname(os.path.abspath(where))
            return MerinoError(f"no permission for {where} ({seen.strerror or 'not permitted'})")
        seen = seen.__cause__ or seen.__context__
    return None


_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _free_bytes(path: str | os.PathLike) -> int:
    try:
        st = os.statvfs(mount_point(path))
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system holding ``path`` (its nearest existing ancestor)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p
