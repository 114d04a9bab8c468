"""The package's shape holds: lib/ is plain library code (no Dagster), and no module imports itself
back through another (a cycle makes import order matter and hides which stage owns what)."""

import ast
from pathlib import Path

import mmctr_assets

PACKAGE = Path(mmctr_assets.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports (at any depth in the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path m -> ... -> m in the import graph, or None."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [m, d] if d in stack else [m, d]
            if d not in state and (cycle := visit(d, stack + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            return cycle
    return None


def test_no_import_cycles():
    graph = {_module_name(p): _internal_imports(p) for p in PACKAGE.rglob("*.py")}
    # a package's __init__ re-importing its children is not a cycle of code; leave it out
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert "mmctr_assets.lib.ctr.layers" in graph["mmctr_assets.lib.ctr.model"]  # the graph is real
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_check_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lib_imports_no_dagster():
    """(The package's __init__ builds the code location and so imports Dagster; lib's own modules
    never do, so they run in any process.)"""
    offenders = [
        str(p.relative_to(PACKAGE)) for p in (PACKAGE / "lib").rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(n.split(".")[0] == "dagster"
                for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]))
    ]
    assert offenders == []


REPO = PACKAGE.parent


def test_library_modules_stay_small_enough_to_read():
    """One module per stage: past this size a module holds two ideas (split it, as clip.py was)."""
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in (PACKAGE / "lib").rglob("*.py")}
    assert sizes and {m: n for m, n in sizes.items() if n > 450} == {}


def test_readme_is_short_and_its_links_and_the_code_map_match_the_tree():
    import re

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200  # the rest lives in docs/
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert "docs/results.md" in links and [link for link in links if not (REPO / link).exists()] == []
    # every file the development map names exists (a renamed module updates the map)
    mapped = re.findall(r"\b([a-z_]+\.py)\b", (REPO / "docs" / "development.md").read_text())
    names = {p.name for p in PACKAGE.rglob("*.py")} | {p.name for p in (REPO / "mmctr_assets_tests").glob("*.py")}
    assert mapped and sorted(set(mapped) - names) == []
