"""The project's import graph, read from the source with `ast` (nothing is imported), for tests/test_import_graph.py.

Every import statement counts, the ones inside functions too: an import placed in a function to dodge a circular
import keeps the circle and only hides it from the reader. Edges are resolved the way Python binds the name:

* relative imports against the importing module's package;
* `from pkg import name`: the submodule `pkg.name` when there is one; otherwise, when `pkg/__init__.py` re-exports
  `name` from one of its modules, that module (the one that defines it); otherwise `pkg` itself;
* `import a.b.c`: the deepest of `a.b.c`, `a.b`, `a` that is a module of the project.

A module's *load closure* is what importing it runs: its top-level imports (not those inside functions, nor those
under `if TYPE_CHECKING:`), its parent packages' `__init__`, and theirs in turn. It tells whether an import inside a
function keeps a heavy package out of the importing module's start-up.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

HEAVY = ("torch", "verl", "vllm", "ray", "transformers", "matplotlib", "omegaconf")
"""Packages worth keeping out of a command's start-up (measured here: `import verl` 3.1 s, torch 1.0 s, transformers
0.7 s, matplotlib.pyplot 0.6 s, ray 0.3 s; vllm pulls torch and transformers), and omegaconf, which the one-GPU
check's machine lacks (only torch and transformers there: `benchmarks/gpu_check.py` imports `bench_packing`)."""


@dataclass(frozen=True)
class Import:
    """One project module named by one import statement."""

    source: str
    """The importing module (`recipe.carl.tiny.demo`)."""
    target: str
    """The imported project module, resolved as the module docstring says."""
    path: Path
    """The importing file."""
    line: int
    """First line of the statement."""
    local: bool
    """Inside a function (runs when the function is called, not when the module is imported)."""
    type_only: bool
    """Under `if TYPE_CHECKING:` (never runs)."""
    node: ast.stmt
    """The statement, for the comment check."""


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    externals: set[str]
    """Top-level names of non-project packages imported at module level (`torch`, `numpy`)."""
    reexports: dict[str, tuple[str, str]]
    """A package's `from X import name as alias` at module level: alias -> (module X, name)."""


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _walk_imports(tree: ast.Module):
    """(statement, inside a function, under `if TYPE_CHECKING:`) for every import statement of a module."""

    def visit(node: ast.AST, local: bool, type_only: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, local, type_only
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, True, type_only)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(ast.Module(body=child.body, type_ignores=[]), local, True)
                yield from visit(ast.Module(body=child.orelse, type_ignores=[]), local, type_only)
            else:
                yield from visit(child, local, type_only)

    yield from visit(tree, False, False)


class ImportGraph:
    """The modules of some top-level packages under `root`, and every import between them."""

    def __init__(self, root: Path, packages: tuple[str, ...]):
        self.root = Path(root)
        self.packages = packages
        self.modules: dict[str, Module] = {}
        for package in packages:
            for path in sorted((self.root / package).rglob("*.py")):
                name, is_package = _module_name(path, self.root)
                tree = ast.parse(path.read_text(), filename=str(path))
                self.modules[name] = Module(name, path, is_package, tree, set(), {})
        for module in self.modules.values():
            self._read_top_level(module)
        self.imports = [imp for module in self.modules.values() for imp in self._imports_of(module)]

    # ------------------------------------------------------------------------------------------------- resolving

    def _absolute(self, module: Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def _is_project(self, name: str) -> bool:
        return name.split(".")[0] in self.packages

    def _deepest(self, dotted: str) -> str | None:
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in self.modules:
                return ".".join(parts[:k])
        return None

    def _resolve_name(self, package: str, name: str, seen: frozenset = frozenset()) -> str | None:
        """The module that `from package import name` takes `name` from (following `__init__` re-exports)."""
        if f"{package}.{name}" in self.modules:
            return f"{package}.{name}"
        module = self.modules.get(package)
        if module is None:
            return self._deepest(package)
        if module.is_package and name in module.reexports and (package, name) not in seen:
            source, original = module.reexports[name]
            return self._resolve_name(source, original, seen | {(package, name)}) or package
        return package

    def _targets(self, module: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if self._is_project(alias.name)]
            return [t for t in map(self._deepest, names) if t]
        base = self._absolute(module, node)
        if not self._is_project(base):
            return []
        if any(alias.name == "*" for alias in node.names):
            return [t for t in [self._deepest(base)] if t]
        return [t for t in (self._resolve_name(base, alias.name) for alias in node.names) if t]

    def _read_top_level(self, module: Module) -> None:
        for node, local, type_only in _walk_imports(module.tree):
            if local or type_only:
                continue
            if isinstance(node, ast.Import):
                module.externals |= {a.name.split(".")[0] for a in node.names if not self._is_project(a.name)}
                continue
            base = self._absolute(module, node)
            if not self._is_project(base):
                module.externals.add(base.split(".")[0])
            elif module.is_package:
                for alias in node.names:
                    module.reexports[alias.asname or alias.name] = (base, alias.name)

    def _imports_of(self, module: Module):
        for node, local, type_only in _walk_imports(module.tree):
            for target in dict.fromkeys(self._targets(module, node)):  # one per module, however many names
                if target != module.name:
                    yield Import(module.name, target, module.path, node.lineno, local, type_only, node)

    # ---------------------------------------------------------------------------------------------------- answers

    def graph(self) -> nx.DiGraph:
        """Module -> module, one edge per pair, with the statements that make it (`imports`)."""
        graph = nx.DiGraph()
        graph.add_nodes_from(self.modules)
        for imp in self.imports:
            if not graph.has_edge(imp.source, imp.target):
                graph.add_edge(imp.source, imp.target, imports=[])
            graph.edges[imp.source, imp.target]["imports"].append(imp)
        return graph

    def cycles(self) -> list[list[str]]:
        """Every elementary circle of modules (each once, starting at its smallest name), in sorted order."""
        found = []
        for cycle in nx.simple_cycles(self.graph()):
            start = cycle.index(min(cycle))
            found.append(cycle[start:] + cycle[:start])
        return sorted(found)

    def describe(self, cycle: list[str]) -> str:
        """A circle as `a -> b (file:line, in a function) -> a`, so the failure message says where each tie is."""
        graph = self.graph()
        steps = []
        for source, target in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            imp = graph.edges[source, target]["imports"][0]
            where = f"{imp.path.relative_to(self.root)}:{imp.line}" + (", in a function" if imp.local else "")
            steps.append(f"{source} -> {target} ({where})")
        return "; ".join(steps)

    def loads(self, name: str) -> set[str]:
        """The external top-level packages that `import name` loads (its load closure, see the module docstring)."""
        return set().union(*(self.modules[m].externals for m in self.closure(name)))

    def closure(self, name: str) -> set[str]:
        """The project modules that `import name` runs: itself, its parent packages, their top-level imports, ..."""
        runs: dict[str, set[str]] = {}
        for imp in self.imports:
            if not (imp.local or imp.type_only):
                runs.setdefault(imp.source, set()).add(imp.target)
        seen: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current in seen or current not in self.modules:
                continue
            seen.add(current)
            parts = current.split(".")
            todo += [".".join(parts[:k]) for k in range(1, len(parts))]  # parent packages run first
            todo += runs.get(current, ())
        return seen

    def deferred(self, imp: Import) -> set[str]:
        """The heavy packages that this function-local import keeps out of its module's start-up."""
        return {p for p in HEAVY if p in self.loads(imp.target) and p not in self.loads(imp.source)}

    def comment_of(self, imp: Import) -> str:
        """The comments that explain a function-local import: on its own lines, or on the comment lines right above
        it or above the imports grouped with it (no blank line between)."""
        lines = imp.path.read_text().splitlines()
        taken = self._import_lines(imp.path)
        own = range(imp.line, (imp.node.end_lineno or imp.line) + 1)
        comments = [lines[i - 1].partition("#")[2] for i in own if "#" in lines[i - 1]]
        i = imp.line - 1
        while i >= 1 and (i in taken or lines[i - 1].lstrip().startswith("#")):
            if "#" in lines[i - 1]:
                comments.append(lines[i - 1].partition("#")[2])
            i -= 1
        return " ".join(c.strip() for c in comments)

    def _import_lines(self, path: Path) -> set[int]:
        module = next(m for m in self.modules.values() if m.path == path)
        return {
            line
            for node, _, _ in _walk_imports(module.tree)
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
        }

    def local_import_problems(
        self, pending: dict[str, str] | None = None, allowed: dict[tuple[str, str], str] | None = None
    ) -> list[str]:
        """Each function-local import of the project's own code that is not there to keep a heavy package out of its
        module's start-up, or whose comment does not say which one. Skipped: the modules in `pending` and the
        `(importing module, imported module)` pairs in `allowed`."""
        problems = []
        for imp in self.imports:
            if not imp.local or imp.source in (pending or {}) or (imp.source, imp.target) in (allowed or {}):
                continue
            where = f"{imp.path.relative_to(self.root)}:{imp.line}"
            deferred = self.deferred(imp)
            if not deferred:
                problems.append(
                    f"{where}: {imp.source} imports {imp.target} inside a function, but that keeps no heavy package "
                    f"({', '.join(HEAVY)}) out of {imp.source}'s start-up: move it to the top of the module."
                )
            elif not any(re.search(rf"\b{p}\b", self.comment_of(imp), re.IGNORECASE) for p in deferred):
                heavy = ", ".join(sorted(deferred))
                problems.append(
                    f"{where}: {imp.source} imports {imp.target} inside a function to keep {heavy} out of its "
                    "start-up: say so in a comment on that line or right above it."
                )
        return problems

    def scripts_run_twice(self) -> list[str]:
        """Modules run as `python -m` (they have an `if __name__ == "__main__":` block) that a parent package's
        `__init__` imports when it loads: runpy then finds the module already imported and runs it a second time, as
        `__main__`, with its own copy of every global (and a RuntimeWarning)."""
        found = []
        for name, module in self.modules.items():
            if not any(
                isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'
                for node in module.tree.body
            ):
                continue
            parts = name.split(".")
            for package in (".".join(parts[:k]) for k in range(1, len(parts))):
                if name in self.closure(package) and package in self.modules:
                    found.append(
                        f"{module.path.relative_to(self.root)}: `python -m {name}` runs it twice, since "
                        f"importing {package} imports it; import it inside the function that needs it"
                    )
        return found
