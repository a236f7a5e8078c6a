"""The package's layering, read from its imports (every import: module level, inside functions
and under ``TYPE_CHECKING``), as docs/architecture.md draws it: the maths knows nothing of
modules, hooks or frameworks, the core imports no experiment, the experiments use the public
API, and the core's modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import trainact

PACKAGE = Path(trainact.__file__).parent
#: Modules of the public API, importable by the experiments (and by users).
PUBLIC = {"trainact", "trainact.testing", "trainact.lightning", "trainact.huggingface"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The trainact modules ``path`` imports (``from trainact.nn import layer`` counts as
    ``trainact.nn.layer`` where that is a module, else as ``trainact.nn``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {name for name in found if name == "trainact" or name.startswith("trainact.")}


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in packages)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}
#: Everything but the ``trainact`` command (its experiments, and ``python -m trainact``).
CORE = {n for n in MODULES if not _under(n, "trainact.experiments", "trainact.__main__")}


def test_the_graph_sees_the_imports_it_should():
    """The reader itself: a few edges every reader of the code can check by eye."""
    assert "trainact.nn.deferred" in GRAPH["trainact.nn.layer"]
    assert "trainact.nn.state" in GRAPH["trainact.nn.deferred"]
    assert "trainact.maths.solve" in GRAPH["trainact.maths.statistics"]
    assert "trainact" in GRAPH["trainact.experiments.train"]


def test_the_maths_imports_nothing_but_the_maths():
    for name in MODULES:
        if _under(name, "trainact.maths"):
            outside = {m for m in GRAPH[name] if not _under(m, "trainact.maths")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_core_imports_no_experiment():
    for name in CORE:
        experiments = {m for m in GRAPH[name] if _under(m, "trainact.experiments")}
        assert not experiments, f"{name} imports {sorted(experiments)}"


def test_the_experiments_use_public_names_only():
    for name in MODULES.keys() - CORE:
        private = {m for m in GRAPH[name] - PUBLIC if not _under(m, "trainact.experiments")}
        assert not private, f"{name} imports {sorted(private)}, which are not public"
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in PUBLIC:
                hidden = [a.name for a in node.names if a.name.startswith("_")]
                assert not hidden, f"{name} imports private {hidden} from {node.module}"
            if (  # trainact.<name> in the code: a name of the top level's __all__
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "trainact"
            ):
                assert node.attr in trainact.__all__ or node.attr.startswith("__"), (
                    f"{name} uses trainact.{node.attr}, which is not public"
                )


def test_the_core_has_no_import_cycle():
    """Depth-first search over the core's imports (a package imports its ``__init__``)."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dependency in sorted(GRAPH.get(name, ())):
            if dependency in CORE and dependency != "trainact":  # the top level re-exports api
                visit(dependency, [*path, name])
        done.add(name)

    for name in sorted(CORE):
        visit(name, [])
