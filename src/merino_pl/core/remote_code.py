"""transformers remote code: the two files that let a model directory load without merino-pl.

``config.json``'s ``auto_map`` (transformers' ``register_for_auto_class`` convention) names
``configuration_merino.MerinoHFConfig`` and ``modeling_merino.MerinoForCausalLM``; with
``trust_remote_code=True`` transformers imports them from the directory itself:

* ``configuration_merino.py``: ``MerinoHFConfig`` and the architecture it parses (``MerinoConfig``,
  ``BlockConfig``, ``validate``), from ``merino_pl/core/hf.py`` and ``merino_pl/core/config.py``;
* ``modeling_merino.py``: the network (``merino_pl/core/model.py``) and ``MerinoForCausalLM``
  (``merino_pl/core/hf.py``), importing its config from the file beside it.

One model source: both files are generated from the package's own modules at export time, never
kept by hand. Each top-level definition is copied verbatim with the comment lines just above it;
which ones is found by following the names the root classes use, so a helper added to ``model.py``,
``hf.py`` or ``config.py`` travels with them. Imports of anything but ``merino_pl`` are kept as written (only
the names used); imports of ``merino_pl`` are resolved into the copied definitions. Nothing else
is copied: no recipe / YAML code, no registration.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "merino_pl"
CONFIG_FILE, MODELING_FILE = "configuration_merino.py", "modeling_merino.py"
AUTO_MAP = {
    "AutoConfig": "configuration_merino.MerinoHFConfig",
    "AutoModelForCausalLM": "modeling_merino.MerinoForCausalLM",
}
# the package's modules the roots live in, dependencies first (hf.py imports model.py, which imports
# config.py); any other merino_pl module a copied definition imports from is read too, and placed before them
SOURCES = ("core.config", "core.model", "core.hf")
# each file: its docstring and the (module, name) definitions its closure starts from
FILES = {
    CONFIG_FILE: (
        "MeRino's transformers config (``MerinoHFConfig``) and the architecture it carries (``MerinoConfig``).",
        [("core.hf", "MerinoHFConfig")],
    ),
    MODELING_FILE: (
        "The MeRino adaptive block-wise shared decoder as a transformers model (``MerinoForCausalLM``).",
        [("core.hf", "MerinoForCausalLM")],
    ),
}


@dataclass
class _Module:
    """One package module, parsed: its lines, its top-level definitions and imports by bound name."""

    name: str
    lines: list[str]
    defs: dict[str, ast.stmt] = field(default_factory=dict)
    imports: dict[str, tuple[ast.stmt, ast.alias]] = field(default_factory=dict)
    position: dict[int, int] = field(default_factory=dict)  # id(statement) -> its index in the module


def _parse(name: str, source: str | None = None) -> _Module:
    """``merino_pl.<name>`` (``a.b`` for a submodule), read from the installed package."""
    if source is None:
        path = Path(__file__).parents[1].joinpath(*name.split("."))  # the merino_pl package
        source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text(encoding="utf-8")
    mod = _Module(name, source.splitlines())
    for i, stmt in enumerate(ast.parse(source).body):
        mod.position[id(stmt)] = i
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            mod.defs[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            mod.defs.update((t.id, stmt) for t in targets if isinstance(t, ast.Name))
        elif isinstance(stmt, ast.Import):
            mod.imports.update(((a.asname or a.name.split(".")[0]), (stmt, a)) for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom) and stmt.module != "__future__":
            mod.imports.update(((a.asname or a.name), (stmt, a)) for a in stmt.names)
    return mod


def _used_names(stmt: ast.stmt) -> list[str]:
    return sorted({n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)})


def _start(mod: _Module, stmt: ast.stmt) -> int:
    """Index of the statement's first line, decorators and the comment lines just above it included."""
    start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])]) - 1
    while start > 0 and mod.lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start


class _Closure:
    """The definitions and external imports a set of roots needs, across the package's modules."""

    def __init__(self, modules: dict[str, _Module], elsewhere: dict[tuple[str, str], str]) -> None:
        self.modules = modules
        self.elsewhere = elsewhere  # (module, name) defined in another generated file -> that file's module
        self.defs: dict[tuple[str, str], ast.stmt] = {}
        self.imports: dict[int, tuple[ast.stmt, list[ast.alias]]] = {}  # id(import statement) -> the aliases used
        self.relative: dict[str, set[str]] = {}  # sibling module -> names imported from it
        self.bound: dict[str, tuple[str, str]] = {}  # bound name -> (module, name): collisions are errors

    def need(self, module: str, name: str) -> None:
        if module not in self.modules:
            self.modules[module] = _parse(module)
        mod = self.modules[module]
        if name in mod.defs:
            key = (module, name)
            if key in self.elsewhere:
                self._bind(name, key)
                self.relative.setdefault(self.elsewhere[key], set()).add(name)
            elif key not in self.defs:
                self._bind(name, key)
                stmt = self.defs[key] = mod.defs[name]
                for used in _used_names(stmt):
                    if used != name:
                        self.need(module, used)
        elif name in mod.imports:
            stmt, alias = mod.imports[name]
            if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").split(".")[0] == PACKAGE:
                self.need(stmt.module.split(".", 1)[1], alias.name)  # resolved into the copied definitions
            else:
                self._bind(name, ("import", f"{getattr(stmt, 'module', '')}:{alias.name}"))
                aliases = self.imports.setdefault(id(stmt), (stmt, []))[1]
                if alias not in aliases:
                    aliases.append(alias)

    def import_lines(self) -> list[str]:
        """The imports used, each statement narrowed to the names used, one ``from`` line per module
        (two source modules may import from the same one), in isort's order."""
        lines, from_names = set(), {}
        for stmt, aliases in self.imports.values():
            if isinstance(stmt, ast.ImportFrom):
                from_names.setdefault((stmt.module, stmt.level), {}).update((ast.unparse(a), a) for a in aliases)
            else:
                lines.add(ast.unparse(ast.Import(sorted(aliases, key=lambda a: a.name))))
        for (module, level), aliases in from_names.items():
            lines.add(ast.unparse(ast.ImportFrom(module, sorted(aliases.values(), key=lambda a: a.name), level)))
        ordered = sorted(lines, key=_import_order)
        first = next((i for i, line in enumerate(ordered) if _import_order(line)[0]), 0)
        return ordered[:first] + [""] + ordered[first:] if first else ordered  # a blank line between the sections

    def _bind(self, name: str, source: tuple[str, str]) -> None:
        if self.bound.setdefault(name, source) != source:
            raise RuntimeError(
                f"remote code: {name!r} would be bound twice in one file ({self.bound[name]} and {source})"
            )


def sources() -> dict[str, str]:
    """``{file name: text}`` of the remote-code files, generated from the installed package."""
    from merino_pl import __version__

    modules = {name: _parse(name) for name in SOURCES}
    texts: dict[str, str] = {}
    elsewhere: dict[tuple[str, str], str] = {}
    for file, (doc, roots) in FILES.items():
        closure = _Closure(modules, elsewhere)
        for module, name in roots:
            closure.need(module, name)
        from_files = sorted({f"{PACKAGE}/{m.replace('.', '/')}.py" for m, _ in closure.defs})
        imports = closure.import_lines()
        relative = [
            f"from .{sibling} import {', '.join(sorted(names))}" for sibling, names in sorted(closure.relative.items())
        ]
        imports += [""] + relative if relative else []
        texts[file] = "\n".join(
            [
                f"# Generated by merino-pl {__version__} from {', '.join(from_files)}: the package's own source,",
                "# copied so that transformers loads this directory with trust_remote_code=True. Do not edit.",
                f'"""{doc}"""',
                "",
                "from __future__ import annotations",
                "",
                *imports,
                "",
                "",
                _body(modules, closure.defs),
                "",
            ]
        )
        elsewhere.update({key: file[: -len(".py")] for key in closure.defs})
    return texts


def _body(modules: dict[str, _Module], defs: dict[tuple[str, str], ast.stmt]) -> str:
    """The definitions in source order (modules dependencies first), each statement once;
    neighbours in the source keep the blank lines between them, others get two."""
    order = [m for m in modules if m not in SOURCES] + list(SOURCES)
    stmts = sorted({(order.index(m), modules[m].position[id(s)], m): s for (m, _), s in defs.items()}.items())
    parts: list[str] = []
    for i, ((_, pos, m), stmt) in enumerate(stmts):
        start = _start(modules[m], stmt)
        if i and stmts[i - 1][0][2] == m and stmts[i - 1][0][1] == pos - 1:
            gap = "\n" * (start - stmts[i - 1][1].end_lineno)  # as written
        else:
            gap = "\n\n"
        parts.append((gap + "\n" if i else "") + "\n".join(modules[m].lines[start : stmt.end_lineno]))
    return "".join(parts)


def _import_order(line: str) -> tuple[bool, bool, str]:
    """isort's order: standard library, then third-party; ``import x`` before ``from x import``."""
    return (line.split()[1].split(".")[0] not in sys.stdlib_module_names, line.startswith("from "), line.split()[1])


def write_remote_code(out: str | Path) -> dict[str, str]:
    """Write both files into directory ``out``; returns the ``auto_map`` for its ``config.json``."""
    out = Path(out)
    for file, text in sources().items():
        (out / file).write_text(text, encoding="utf-8")
    return dict(AUTO_MAP)
