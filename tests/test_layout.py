"""The code's plan holds: imports follow the stages' declared direction, no modules import in a
circle, and no module grows past ~400 lines. Read with ``ast`` from the files themselves (every
import counts, also those inside functions), so a new import against the plan fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Who may import whom inside pipeline/ (pipeline/__init__.py states the same table in words).
ALLOWED = {
    "io": set(),
    "masks": set(),
    "config": {"io"},
    "store": {"io", "config", "masks"},
    "worker": {"io", "config", "masks", "store"},
    "driver": {"io", "config", "store", "worker"},
    "quality": {"io", "config", "masks", "store", "driver", "worker"},
    "look": {"io", "config", "masks", "store"},
    "export": {"io", "config", "masks", "store"},
}
# Modules over the limit, each one cohesive thing: the schema of every config key.
LONG_MODULES = {"pipeline/config/label_config.py"}
MAX_LINES = 400
PACKAGES = ("gem", "pipeline", "jobs", "gemlabel")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The project's modules a file imports (``from a import b`` counts as ``a.b`` where that is a module)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # import a.b.c of a module a.b, or a name of a package
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(path, known) for name, path in found.items()}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def test_every_stage_is_declared():
    stages = {stage(m) for m in modules() if stage(m)}
    assert stages == set(ALLOWED), "a sub-package of pipeline/ without its line in ALLOWED (and pipeline/__init__)"
    loose = [path.name for path in (REPO / "pipeline").glob("*.py") if path.name != "__init__.py"]
    assert not loose, f"pipeline/ holds only sub-packages: {loose}"


def test_imports_follow_the_stages():
    wrong = []
    for module, targets in import_graph().items():
        top = module.split(".")[0]
        for target in targets:
            if top == "gem" and target.split(".")[0] != "gem":
                wrong.append(f"{module} -> {target} (gem imports nothing of gemlabel's pipeline)")
            if top == "pipeline" and target.split(".")[0] == "jobs":
                wrong.append(f"{module} -> {target} (the pipeline never imports the command line)")
            source, dest = stage(module), stage(target)
            if source and dest and source != dest and dest not in ALLOWED[source]:
                wrong.append(f"{module} -> {target} ({source} may import {sorted(ALLOWED[source]) or 'nothing'})")
    assert not wrong, "imports against the declared direction:\n" + "\n".join(sorted(wrong))


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports between modules, or [] (a depth-first search; a package importing
    its own sub-modules, or one importing its package, is no circle)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def edges(module: str) -> set[str]:
        return {t for t in graph.get(module, ()) if not t.startswith(module + ".") and not module.startswith(t + ".")}

    def visit(module: str) -> list[str]:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges(module)):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return []


def test_no_modules_import_in_a_circle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_checks_catch_a_circle_and_a_wrong_direction():
    """The checks above can fail: a planted circle is found, a store -> worker import is named."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"pipeline.x": {"pipeline.x.y"}, "pipeline.x.y": {"pipeline.x"}}) == []
    assert "worker" not in ALLOWED["store"] and "driver" not in ALLOWED["worker"]


@pytest.mark.parametrize("package", ["pipeline", "jobs", "gem", "gemlabel"])
def test_modules_stay_small(package):
    long = [f"{path.relative_to(REPO)} ({len(path.read_text().splitlines())} lines)"
            for path in (REPO / package).rglob("*.py")
            if len(path.read_text().splitlines()) > MAX_LINES and str(path.relative_to(REPO)) not in LONG_MODULES]
    assert not long, f"modules over {MAX_LINES} lines (split them, or name a cohesive one in LONG_MODULES)"


def test_each_stage_says_what_it_owns_and_may_import():
    for name in ALLOWED:
        doc = ast.get_docstring(ast.parse((REPO / "pipeline" / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"pipeline/{name}/__init__.py: say what it owns and may import"
    table = ast.get_docstring(ast.parse((REPO / "pipeline" / "__init__.py").read_text()))
    table = table.split("Who may import whom", 1)[1]
    for name, allowed in ALLOWED.items():
        line = next(l for l in table.splitlines() if l.strip().startswith(f"{name} ") and "->" in l)
        stated = {part.strip() for part in line.split("->", 1)[1].split(",")} - {"(nothing of the pipeline)"}
        assert stated == allowed, f"pipeline/__init__.py's table says {name} -> {stated}, the test {allowed}"
