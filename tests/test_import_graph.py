"""No circles among the project's modules, counting imports inside functions; a function-local import of the project's
own code is there only to keep a heavy package out of a module's start-up, and a comment says which.

Why a comment is required rather than an allow-list: the graph computes what each function-local import defers (the
heavy packages the imported module loads that the importing one does not), so the check is exact, and the comment
tells the reader the same thing where the import stands. Only modules that another branch is rewriting wait in
`PENDING`; an entry that no longer hides a problem fails, so the list cannot go stale.
"""

from pathlib import Path

from tests.import_graph import ImportGraph

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("carl_core", "recipe", "benchmarks", "data_preprocess")
PENDING: dict[str, str] = {}
"""Modules whose function-local imports are not checked yet, each with the reason."""
ALLOWED = {
    ("recipe.carl.cpu", "recipe.carl.cpu.vllm_cpu"): "`python -m recipe.carl.cpu.vllm_cpu` would run it twice",
}
"""Function-local imports kept for another reason than a heavy package: (importing module, imported module) -> why.
Each must also say why in a comment where it stands."""


def test_the_project_has_no_circles():
    graph = ImportGraph(REPO, PACKAGES)
    circles = [graph.describe(cycle) for cycle in graph.cycles()]
    assert not circles, "circles of imports (move what both modules need to the one that owns it):\n" + "\n".join(
        circles
    )


def test_function_local_imports_of_the_project_defer_a_heavy_package_and_say_so():
    problems = ImportGraph(REPO, PACKAGES).local_import_problems(PENDING, ALLOWED)
    assert not problems, "\n".join(problems)


def test_no_module_run_with_python_m_is_imported_by_its_own_package():
    twice = ImportGraph(REPO, PACKAGES).scripts_run_twice()
    assert not twice, "\n".join(twice)


def test_pending_and_allowed_entries_still_need_their_place():
    graph = ImportGraph(REPO, PACKAGES)
    unchecked = {p.split(":")[0] for p in graph.local_import_problems()}
    for module, why in PENDING.items():
        assert module in graph.modules, f"PENDING names {module}, which no longer exists ({why}): remove it"
        path = str(graph.modules[module].path.relative_to(REPO))
        assert path in unchecked, f"{module} passes the check now: remove it from PENDING"
    local = {(i.source, i.target) for i in graph.imports if i.local}
    for pair, why in ALLOWED.items():
        assert pair in local, f"ALLOWED lists {pair} ({why}), which is no longer a function-local import: remove it"


# ------------------------------------------------------------------------------------------- a planted package


def write_package(root: Path) -> None:
    """A small package with a circle through a function-local import, a re-export, relative imports of both kinds,
    a dotted `import`, a `TYPE_CHECKING` import, and function-local imports that do and do not defer torch."""
    files = {
        "pkg/__init__.py": "from pkg.names import NAME\n",
        "pkg/names.py": "NAME = 'n'\n",
        "pkg/core.py": (
            "import torch\n"
            "from . import NAME\n"  # a re-export of pkg: the edge goes to pkg.names
            "def thing():\n    return NAME\n"
            "def helper():\n    from pkg import user\n    return user\n"  # a submodule, inside a function
        ),
        "pkg/user.py": "from .core import thing\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..names import NAME\n",
        "pkg/light.py": "import pkg.sub.deep\ndef f():\n    from pkg.names import NAME\n    return NAME\n",
        "pkg/heavy_user.py": (
            "def commented():\n"
            "    # here, not at the top: core imports torch\n"
            "    from pkg.core import thing\n"
            "    return thing\n"
            "def silent():\n"
            "    from pkg.core import thing\n"
            "    return thing\n"
        ),
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.core import thing\n",
        "pkg/tool.py": "if __name__ == '__main__':\n    print('run')\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_planted_circle_is_found_with_the_function_local_import(tmp_path):
    write_package(tmp_path)
    graph = ImportGraph(tmp_path, ("pkg",))
    edges = {(i.source, i.target, i.line, i.local, i.type_only) for i in graph.imports}
    assert edges == {
        ("pkg", "pkg.names", 1, False, False),
        ("pkg.core", "pkg.names", 2, False, False),
        ("pkg.core", "pkg.user", 6, True, False),
        ("pkg.user", "pkg.core", 1, False, False),
        ("pkg.sub.deep", "pkg.names", 1, False, False),
        ("pkg.light", "pkg.sub.deep", 1, False, False),
        ("pkg.light", "pkg.names", 3, True, False),
        ("pkg.heavy_user", "pkg.core", 3, True, False),
        ("pkg.heavy_user", "pkg.core", 6, True, False),
        ("pkg.typed", "pkg.core", 3, False, True),
    }
    assert graph.cycles() == [["pkg.core", "pkg.user"]]
    assert graph.describe(["pkg.core", "pkg.user"]) == (
        "pkg.core -> pkg.user (pkg/core.py:6, in a function); pkg.user -> pkg.core (pkg/user.py:1)"
    )
    # Without the import in the function there is no circle.
    core = tmp_path / "pkg" / "core.py"
    core.write_text(core.read_text().replace("    from pkg import user\n", "    user = None\n"))
    assert ImportGraph(tmp_path, ("pkg",)).cycles() == []


def test_a_function_local_import_must_defer_a_heavy_package_and_say_so(tmp_path):
    write_package(tmp_path)
    graph = ImportGraph(tmp_path, ("pkg",))
    # What importing each module loads: core imports torch; a TYPE_CHECKING import and a function's import do not run.
    assert "torch" in graph.loads("pkg.core") and "torch" in graph.loads("pkg.user")
    assert "torch" not in graph.loads("pkg.typed") and "torch" not in graph.loads("pkg.light")
    problems = graph.local_import_problems()
    assert [p.split(": ", 1)[0] for p in problems] == ["pkg/core.py:6", "pkg/heavy_user.py:6", "pkg/light.py:3"]
    assert "keeps no heavy package" in problems[0] and "move it to the top of the module" in problems[2]
    assert "to keep torch out of its start-up: say so in a comment" in problems[1]
    assert graph.local_import_problems({"pkg.core": "", "pkg.light": "", "pkg.heavy_user": ""}) == []


def test_a_module_run_with_python_m_and_imported_by_its_package_is_found(tmp_path):
    write_package(tmp_path)
    assert ImportGraph(tmp_path, ("pkg",)).scripts_run_twice() == []
    sub_init = tmp_path / "pkg" / "sub" / "__init__.py"
    sub_init.write_text("from pkg.sub.deep import NAME\n")  # deep has no __main__ block: fine
    assert ImportGraph(tmp_path, ("pkg",)).scripts_run_twice() == []
    (tmp_path / "pkg" / "names.py").write_text("import pkg.tool\nNAME = 'n'\n")  # pkg/__init__ -> names -> tool
    assert ImportGraph(tmp_path, ("pkg",)).scripts_run_twice() == [
        "pkg/tool.py: `python -m pkg.tool` runs it twice, since importing pkg imports it; import it inside the "
        "function that needs it"
    ]
