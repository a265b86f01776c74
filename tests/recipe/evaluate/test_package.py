"""`recipe.carl.evaluate` as a package: its modules import in one direction, `stats` needs only numpy, and the names
other code imports from the package keep working."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import recipe.carl.evaluate as package

#: Each module may import only the modules before it.
LAYERS = ["settings", "stats", "judge", "data", "models", "engines", "runner", "report", "cli", "study"]
FOLDER = Path(package.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_modules_import_in_one_direction():
    assert sorted(LAYERS) == sorted(p.stem for p in FOLDER.glob("*.py") if not p.stem.startswith("__"))
    for rank, name in enumerate(LAYERS):
        imported = imported_modules(FOLDER / f"{name}.py")
        inside = {m.rsplit(".", 1)[1] for m in imported if m.startswith(package.__name__ + ".")}
        assert inside <= set(LAYERS[:rank]), f"{name} imports {sorted(inside - set(LAYERS[:rank]))}, above it"


def test_stats_needs_only_numpy_and_the_standard_library():
    roots = {m.split(".")[0] for m in imported_modules(FOLDER / "stats.py")}
    assert roots - set(sys.stdlib_module_names) - {"__future__"} == {"numpy"}


def test_the_public_names_are_importable_from_the_package():
    from recipe.carl.evaluate import EvalError, EvalSettings, Evaluator, HFEngine, main, make_search, summarize

    assert {EvalError, EvalSettings, Evaluator, HFEngine, main, make_search, summarize}
    assert all(hasattr(package, name) for name in package.__all__)
