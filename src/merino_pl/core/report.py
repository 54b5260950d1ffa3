"""What every stage's report schema shares: a versioned JSON object read back into its dataclass.

Each stage keeps its own report class (``EvalReport``, ``LatencyReport``, ``QuantizeReport``)
beside its renderer; this holds only the reading rules they have in common, so a report that is
not one (another format, a newer version, a missing field) is the same one-line ``MerinoError``
everywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from merino_pl.core.errors import MerinoError
from merino_pl.core.io import atomic_write_text, read_json, write_json

T = TypeVar("T")


def check_version(data: Any, what: str, source: str, version: int, format_name: str | None = None) -> int:
    """The report's ``format_version`` (1 when written before the field existed); a ``MerinoError``
    when ``data`` is not a JSON object, has another ``format`` or a version this code cannot read."""
    if not isinstance(data, dict) or (format_name is not None and data.get("format") != format_name):
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        article = "an" if what[:1] in "aeiou" else "a"
        raise MerinoError(f"{source}: not {article} {what} (format {format_name!r}; got {got!r})")
    found = data.get("format_version", 1)
    if not isinstance(found, int) or found > version:
        raise MerinoError(f"{source}: {what} format_version {found!r} (this merino-pl reads <= {version})")
    return found


def from_fields(cls: type[T], data: dict[str, Any], what: str, source: str, optional: tuple[str, ...] = ()) -> T:
    """``cls(**data)`` over ``cls``'s fields (unknown keys ignored); a missing field that is not
    ``optional`` is a ``MerinoError`` naming it."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(names - set(data) - set(optional))
    if missing:
        raise MerinoError(f"{source}: {what} without {', '.join(missing)}")
    return cls(**{k: v for k, v in data.items() if k in names})


def report_file(path: str | Path, json_name: str) -> Path:
    """``path`` itself, or ``path / json_name`` when ``path`` is the directory holding the report."""
    path = Path(path)
    return path / json_name if path.is_dir() else path


class FileReport:
    """A report written as ``json_name`` + ``markdown_name`` into a directory, and read back.
    Subclasses (dataclasses) give ``from_json``, ``to_json`` and ``markdown``."""

    json_name: ClassVar[str]
    markdown_name: ClassVar[str]
    what: ClassVar[str]

    @classmethod
    def read(cls, path: str | Path) -> Any:
        """The report in ``path`` (its JSON file, or the directory holding it)."""
        path = report_file(path, cls.json_name)
        return cls.from_json(read_json(path, cls.what), str(path))  # type: ignore[attr-defined]

    def write(self, directory: str | Path) -> str:
        """Both files into ``directory`` (each atomically); returns the Markdown."""
        directory = Path(directory)
        write_json(directory / self.json_name, self.to_json())  # type: ignore[attr-defined]
        markdown = self.markdown()  # type: ignore[attr-defined]
        atomic_write_text(directory / self.markdown_name, markdown)
        return markdown
