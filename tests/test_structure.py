"""The shape of runner/: no import cycles (function-level imports included), no module past 600 lines, every
stage's entry point documents what it raises, and the stage contract's boundaries: a stage never imports the store or
the planner, and the store never imports a stage.

A cycle hidden by a function-level import still ties two modules into one: neither can be read, tested or moved
alone, and the import order decides which half sees the other half-initialized. ruff cannot see cycles, so this test
reads every module's imports with `ast` (those under `if TYPE_CHECKING:` excluded: they never run).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
from pathlib import Path

import pytest

from runner import stages

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 600


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py below `root` (a package named like its folder)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (annotations only; never imported at run time)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` imports anywhere: at the top, in a function, in a try block."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .mod import y
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule; a name imports pkg
                found.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin)
    return {module for module in found if module in modules and module != name}


def cycles(root: Path) -> list[list[str]]:
    """Each import cycle among the modules below `root`, as a path that returns to where it started."""
    modules = module_names(root)
    graph = {name: sorted(imports_of(name, path, modules)) for name, path in modules.items()}
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name):] + [name]
            if not any(set(cycle) == set(seen) for seen in found):
                found.append(cycle)
            return
        if name in done:
            return
        for target in graph[name]:
            visit(target, [*trail, name])
        done.add(name)

    for name in graph:
        visit(name, [])
    return found


def test_runner_has_no_import_cycles():
    assert [" -> ".join(cycle) for cycle in cycles(REPO / "runner")] == []


def boundary_crossings(root: Path, inner: str, forbidden: tuple[str, ...]) -> list[str]:
    """`module -> import` for every module under the package `inner` that imports one of `forbidden` (or a module
    below one of them), function-level imports included."""
    modules = module_names(root)
    found = []
    for name, path in modules.items():
        if name != inner and not name.startswith(inner + "."):
            continue
        for imported in sorted(imports_of(name, path, modules)):
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                found.append(f"{name} -> {imported}")
    return found


def test_stages_never_import_the_store_or_the_planner():
    """runner/stages/__init__.py: a stage gets its inputs and an empty folder; it never touches the cache or plans.
    (evaluate's memo folder is handed to it by the executor; the key helpers it shares with the planner are in
    runner/keys.py.)"""
    forbidden = ("runner.store", "runner.plan", "runner.execute", "runner.lockfile")
    assert boundary_crossings(REPO / "runner", "runner.stages", forbidden) == []


def test_the_store_never_imports_a_stage():
    """The store is given what it needs (a stage's record patterns) by its callers: it knows no stage."""
    assert boundary_crossings(REPO / "runner", "runner.store", ("runner.stages", "runner.plan", "runner.execute")) == []


def synthetic_package(root: Path, files: dict[str, str]) -> Path:
    """A package `pkg` under root with these files (path inside it -> source), for the checks' own tests."""
    package = root / "pkg"
    for name, source in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source)
    return package


def test_the_cycle_check_sees_a_cycle_hidden_in_a_function(tmp_path):
    package = synthetic_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import helper\n",
        "b.py": "def helper():\n    from pkg import a  # dodges the cycle at import time\n    return a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
    })
    assert cycles(package) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_relative_imports_count_too(tmp_path):
    package = synthetic_package(tmp_path, {
        "__init__.py": "", "sub/__init__.py": "", "sub/x.py": "from . import y\n", "sub/y.py": "from .x import z\n"})
    assert cycles(package) == [["pkg.sub.x", "pkg.sub.y", "pkg.sub.x"]]


def test_the_boundary_check_sees_a_stage_that_reaches_into_the_store(tmp_path):
    package = synthetic_package(tmp_path, {
        "__init__.py": "", "store/__init__.py": "", "store/local.py": "X = 1\n",
        "stages/__init__.py": "", "stages/train.py": "def run():\n    from pkg.store.local import X\n    return X\n",
    })
    assert boundary_crossings(package, "pkg.stages", ("pkg.store",)) == ["pkg.stages.train -> pkg.store.local"]


def defined_names(path: Path) -> set[str]:
    """What a module defines itself at its top level (functions, classes, assignments); a package's __init__ also
    counts what it lists in __all__ (its documented entry points)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        if isinstance(node, ast.Assign) and path.name == "__init__.py" and "__all__" in names:
            names |= {elt.value for elt in getattr(node.value, "elts", []) if isinstance(elt, ast.Constant)}
    return names


def borrowed_imports(files: list[Path], modules: dict[str, Path]) -> list[str]:
    """`from runner.x import name` where runner.x does not define `name` but only imports it from elsewhere: a
    re-export, which a monkeypatch cannot reach and a move leaves stale."""
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in modules:
                continue
            defined = defined_names(modules[node.module])
            for alias in node.names:
                if alias.name not in defined and f"{node.module}.{alias.name}" not in modules:
                    found.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_code_imports_each_name_from_the_module_that_defines_it():
    modules = module_names(REPO / "runner")
    files = [*modules.values(), *sorted((REPO / "tests").glob("*.py")), *sorted((REPO / "bench").glob("*.py")),
             REPO / "noxfile.py"]
    assert borrowed_imports(files, modules) == []


def test_the_re_export_check_sees_a_name_borrowed_through_another_module(tmp_path):
    package = synthetic_package(tmp_path, {
        "__init__.py": 'from pkg.a import helper\n__all__ = ["helper"]\n',
        "a.py": "def helper():\n    return 1\n",
        "b.py": "from pkg.a import helper  # b uses it, and so re-exports it by accident\n",
        "c.py": "from pkg.b import helper\nfrom pkg.a import helper as h\nfrom pkg import helper, a\n",
    })
    modules = module_names(package)
    assert borrowed_imports([package / "c.py"], modules) == ["c.py:1: pkg.b.helper"]


def test_no_module_in_runner_is_longer_than_600_lines():
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in module_names(REPO / "runner").values()}
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("kind", list(stages.STAGES))
def test_every_stage_entry_point_says_what_it_raises(kind):
    """Each stage's run() docstring lists the conditions that raise StageError, so a reader learns a stage's
    preconditions without reading the module."""
    run = importlib.import_module(stages.STAGES[kind].module).run
    assert "Raises:" in (run.__doc__ or "") and "StageError" in run.__doc__


def readme_layout(readme: str) -> set[str]:
    """The paths the README's layout tree names: each line `  name   description` under `## Project layout`, its depth
    given by two spaces of indentation per level (`folder/` lines open a level)."""
    section = readme.split("## Project layout", 1)[1]
    block = section.split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S*)", line)
        depth = len(match.group(1)) // 2
        if not match or not re.fullmatch(r"[\w.]+/?", match.group(2)) or depth > len(stack):
            continue  # a description's continuation line (indented past any name's level)
        stack[depth:] = [match.group(2).rstrip("/")]
        paths.add("/".join(stack))
    return paths


def test_the_readme_layout_names_every_module_in_runner_and_nothing_else():
    """A newcomer finds code by the README's tree: every module of runner/ is in it (package __init__ files aside,
    which are listed where they hold a stage's run()), and every file it names exists."""
    listed = readme_layout((REPO / "README.md").read_text())
    tracked = subprocess.run(["git", "ls-files", "runner"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    modules = {path for path in tracked.split() if path.endswith(".py") and not path.endswith("__init__.py")}
    folders = {str(Path(path).parent) for path in tracked.split()}
    assert modules - listed == set(), "modules missing from the README's layout"
    named = {path for path in listed if path.startswith("runner/") and path.endswith(".py")}
    assert {path for path in named if not (REPO / path).is_file()} == set(), "the README's layout names missing files"
    assert {path for path in listed if path.startswith("runner/") and "." not in Path(path).name} - folders == set()


def test_the_layout_check_sees_a_module_the_readme_does_not_name(tmp_path):
    readme = "## Project layout\n\n```\nrunner/\n  cli.py     the CLI\n  stages/    stages\n    train/\n" \
             "      job.py   the job\n```\n"
    assert readme_layout(readme) == {"runner", "runner/cli.py", "runner/stages", "runner/stages/train",
                                     "runner/stages/train/job.py"}

