"""The package's shape: subpackages in pipeline order, each importing only the core and the subpackages before it
(no cycles, `TYPE_CHECKING` imports counted too), a core that does not import torch, and no module that shadows the
standard library."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "convobot"
# The pipeline, in the order data flows: each layer may import the layers before it, never those after.
LAYERS = ("core", "data", "model", "runs", "scoring", "plan", "training", "release", "serving", "reports")
CORE = {"config", "errors", "cli", "atomic", "template"}
# Front doors: `convobot <command>` and `python -m convobot.train`; they may import anything, nothing imports them.
ENTRY = {"__main__", "train"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    first = module.split(".")[1] if "." in module else "core"
    if first in CORE:
        return "core"
    return "entry" if first in ENTRY else first


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """convobot modules `path` imports anywhere: functions included (a lazy import is still a dependency), and
    `if TYPE_CHECKING:` blocks too (a type-only import still ties the modules together)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from convobot import atomic` names a module; `from convobot.x import f` not
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    # A package's __init__ runs on the way to any of its modules, but is not their dependency here.
    return {name: imported_modules(path, known) - {name, "convobot"} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target, stack + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for each import of a later layer (or of a front door) by an earlier one."""
    rank = {name: index for index, name in enumerate(LAYERS)} | {"entry": len(LAYERS)}
    return [f"{source} ({layer(source)}) -> {target} ({layer(target)})" for source, targets in sorted(graph.items())
            for target in sorted(targets) if rank[layer(target)] > rank[layer(source)]
            or (layer(target) == "entry" and target != source)]


def test_the_checks_find_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = {"convobot.data.load": {"convobot.training.recipe"}, "convobot.training.recipe": {"convobot.data.load"}}
    assert backward_imports(graph) == ["convobot.data.load (data) -> convobot.training.recipe (training)"]


def test_every_module_is_in_a_layer():
    assert {layer(name) for name in import_graph()} == {*LAYERS, "entry"}
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == (
        set(LAYERS) - {"core"}) | {"config"}


def test_imports_follow_the_pipeline():
    graph = import_graph()
    assert "convobot.runs.bundle" in graph["convobot.runs.loading"]  # the graph sees imports of both forms
    assert "convobot.model.base" in graph["convobot.model.adapters"]
    assert backward_imports(graph) == []
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_type_checking_imports_are_counted(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from convobot.runs.rundir import RunDir\n")
    assert imported_modules(source, {"convobot.runs.rundir"}) == {"convobot.runs.rundir"}


def test_every_subpackage_says_what_it_holds():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 8, f"{init}: a docstring saying what the subpackage holds"
        for module in sorted(init.parent.glob("*.py")):
            if module.stem not in ("__init__", "__main__"):
                assert f"{module.name}" in doc, f"{init} does not mention {module.name}"


def test_the_core_and_the_front_door_do_not_import_torch():
    code = ("import sys, convobot.config, convobot.cli, convobot.errors, convobot.atomic, convobot.template, "
            "convobot.__main__; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert not names & sys.stdlib_module_names, names & sys.stdlib_module_names


def test_lint_passes():
    """pyflakes and import order ([tool.ruff] in pyproject.toml): no undefined or unused names anywhere."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "convobot", "tests", "benchmarks"],
                            cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
