"""Every ``trainact.x.y`` that a docstring of the package, the README or a docs page names exists:
a renamed or removed function cannot leave a docstring pointing at nothing."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "trainact"  # the sources, whichever copy of trainact is imported
#: A dotted name under trainact (a trailing dot or call parentheses are not part of it).
CITED = re.compile(r"(?<![\w./-])trainact(?:\.[A-Za-z_]\w*)+")


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    nodes += [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def _texts() -> dict[str, list[str]]:
    texts = {str(p.relative_to(ROOT)): _docstrings(p) for p in sorted(PACKAGE.rglob("*.py"))}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if page.exists():  # the docs travel with the repository, not with the wheel
            texts[str(page.relative_to(ROOT))] = [page.read_text()]
    return texts


def resolves(name: str) -> bool:
    """Whether ``name`` is a module of the package or an attribute reachable from one; skips
    the test where that module exists but needs what is not installed here (an extra)."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        module = ".".join(parts[:split])
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent is no package: the name is an attribute
            found = False
        except ImportError as err:  # a parent needs what is not installed
            pytest.skip(f"{module} cannot be imported here: {err}")
        if not found:
            continue
        try:
            target: object = importlib.import_module(module)
        except ImportError as err:
            pytest.skip(f"{module} cannot be imported here: {err}")
        for attr in parts[split:]:
            if not hasattr(target, attr):
                return False
            target = getattr(target, attr)
        return True
    return False


def _cited() -> list[tuple[str, str]]:
    found = {
        (where, name)
        for where, texts in _texts().items()
        for text in texts
        for name in CITED.findall(text)
        if not name.endswith((".py", ".md"))
    }
    return sorted(found)


def test_the_reader_finds_citations_and_tells_missing_ones():
    assert ("src/trainact/api.py", "trainact.maths.precision") in _cited()
    assert resolves("trainact.maths.precision.gpu_precision")
    assert not resolves("trainact.nn.layer.gemm_dtype")


@pytest.mark.parametrize("where,name", _cited())
def test_every_cited_name_exists(where, name):
    assert resolves(name), f"{where} cites {name}, which does not exist"


@pytest.mark.parametrize("module", ["trainact", "trainact.api", "trainact.testing"])
def test_the_public_examples_run(module):
    """The examples in the public docstrings run and print what they show."""
    import doctest

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
