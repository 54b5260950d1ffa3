"""The import graph keeps merino-pl's two layers apart (docs/architecture.md).

Every ``import`` in ``src/merino_pl`` (module level and inside functions) is read from the AST.
The **core** (config, costs, io, errors, model, tokenizer, checkpoint, the quantized formats, the
search-space and latency-table formats) imports no stage; a **stage** imports the core, itself
and, of another stage, only that stage's public entry (``PUBLIC``). There are no exceptions
beyond ``ALLOWED``; the last test shows the checker catching each kind of back-edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "merino_pl"


def is_core(module: str) -> bool:
    """The core: the package root (lazy public names only) and everything under ``merino_pl.core``."""
    return module == "merino_pl" or module == "merino_pl.core" or module.startswith("merino_pl.core.")


# the dispatch table: imports stages by name (importlib), imported by no library module
ENTRY = {"merino_pl.cli"}

# what one stage may import of another: its public entry points (module -> why)
PUBLIC = {
    "merino_pl.data": "PileDataModule, what fit trains on",
    "merino_pl.data.sources": "the one resolver for every data source",
    "merino_pl.search": "recipe_entropy: the entropy info and fit report for any recipe",
    "merino_pl.search.api": "the search stage's entry (SearchSettings, build_problem, decode, run_search)",
    "merino_pl.fit.api": "the fit stage's entry",
    "merino_pl.eval.api": "the eval stage's entry",
    "merino_pl.info.api": "summarize / format_table: a recipe's figures and table (demo shows them)",
    "merino_pl.eval.report": "the eval report's renderer (whoever shows a report calls its renderer)",
    "merino_pl.eval.intrinsic": "held-out nats / character and bits / byte at the trained context (pipeline summary)",
    "merino_pl.generate.api": "the generate stage's entry: the continuations the demo's summary shows",
    "merino_pl.latency.plot": "the latency plot's renderer",
    "merino_pl.latency.report": "LatencyReport: the latency report's schema (the pipeline's summary reads it)",
    "merino_pl.export.onnx": "the export stage's ONNX entry: latency times the graph a user deploys",
    "merino_pl.export.session": "the exported graph on onnxruntime: latency's and generate's decoders run it",
    "merino_pl.export.executorch": "the ExecuTorch program on its runtime (PteRunner): generate and latency run it",
    "merino_pl.quantize.api": "the quantize stage's entry: latency's int rows of a float model are its RTN output",
}

# (importer, imported) pairs allowed beyond PUBLIC, each with its reason
ALLOWED = {
    ("merino_pl.pipeline.api", "merino_pl.cli"): "the orchestrator checks each stage through the dispatch table",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> set[tuple[str, str]]:
    """(importer, imported module) for every merino_pl import under ``root``, at any depth in
    the file; ``from package import name`` counts as importing ``package.name`` when that is a
    module."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    edges: set[tuple[str, str]] = set()
    for f in files:
        me = module_name(f, root)
        package = me if f.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            if isinstance(node, ast.Import):
                edges |= {(me, a.name) for a in node.names if a.name.split(".")[0] == "merino_pl"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                if base.split(".")[0] != "merino_pl":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add((me, sub if sub in modules else base))
    return {(a, b) for a, b in edges if a != b}


def stage(module: str) -> str | None:
    """The stage a module belongs to (None for the core and the entry)."""
    if is_core(module) or module in ENTRY:
        return None
    return module.split(".")[1]


def violations(edges: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Every edge that breaks the layering, with what it breaks."""
    bad = {}
    for importer, imported in sorted(edges):
        if (importer, imported) in ALLOWED or importer in ENTRY:
            continue
        if imported in ENTRY:
            bad[(importer, imported)] = "imports the CLI dispatch table"
        elif is_core(importer) and not is_core(imported):
            bad[(importer, imported)] = f"the core imports the {stage(imported)} stage"
        elif (
            not is_core(importer)
            and not is_core(imported)
            and stage(importer) != stage(imported)
            and imported not in PUBLIC
        ):
            bad[(importer, imported)] = f"the {stage(importer)} stage imports {stage(imported)}'s internals"
    return bad


def test_no_back_edges() -> None:
    unexpected = violations(import_graph())
    assert not unexpected, "layering broken (see docs/architecture.md):\n" + "\n".join(
        f"  {a} -> {b}: {why}" for (a, b), why in unexpected.items()
    )


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "merino_pl"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pkg


@pytest.mark.parametrize(
    ("files", "edge"),
    [
        # the core reaching up into a stage, inside a function
        (
            {"core/config.py": "def f():\n    from merino_pl.search.api import decode\n"},
            ("merino_pl.core.config", "merino_pl.search.api"),
        ),
        # a stage importing another stage's internals, relative import
        (
            {"fit/__init__.py": "", "fit/api.py": "from ..search import entropy\n"},
            ("merino_pl.fit.api", "merino_pl.search.entropy"),
        ),
        # a library module importing the CLI dispatch table
        (
            {"search/__init__.py": "", "search/api.py": "import merino_pl.cli\n"},
            ("merino_pl.search.api", "merino_pl.cli"),
        ),
    ],
)
def test_checker_catches_an_added_back_edge(tmp_path: Path, files: dict[str, str], edge: tuple[str, str]) -> None:
    clean = {
        "__init__.py": "",
        "cli.py": "",
        "core/__init__.py": "",
        "core/config.py": "from merino_pl.core.errors import MerinoError\n",
        "core/errors.py": "",
        "search/__init__.py": "",
        "search/entropy.py": "from merino_pl.core.config import x\n",
        "search/api.py": "from merino_pl.search import entropy\n",
        "fit/__init__.py": "",
        "fit/api.py": "from merino_pl.search.api import decode\nfrom merino_pl.core import config\n",
    }
    assert violations(import_graph(_write(tmp_path / "clean", clean))) == {}
    graph = import_graph(_write(tmp_path / "broken", {**clean, **files}))
    assert edge in graph and edge in violations(graph)
