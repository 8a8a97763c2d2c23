"""The import layering of docs/architecture.md ("Layers"), enforced: every module of the package belongs to a
wing of that table, imports only its own wing and the wings its row allows, and no import cycle exists between
modules. Imports inside functions count as imports (they hide cycles, they do not remove them)."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def layer_table() -> dict[str, tuple[list[str], set[str]]]:
    """{wing: (module patterns, allowed wings)} from the "## Layers" table of docs/architecture.md."""
    text = DOC.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("wing", "") or set(cells[0]) <= {"-"}:
            continue
        patterns = re.findall(r"`([^`]+)`", cells[1])
        allowed = {w.strip() for w in cells[2].split(",") if w.strip() not in ("–", "-", "")}
        table[cells[0]] = (patterns, allowed)
    assert table, f"no layer table found under '## Layers' in {DOC}"
    return table


def package_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the trimode package (runtime/, build/, plugins/, root)."""
    files = [ROOT / "__init__.py"]
    for top in ("runtime", "build", "plugins"):
        files += sorted((ROOT / top).rglob("*.py"))
    out = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(("trimode",) + tuple(p for p in parts if p != "__init__"))] = path
    return out


def wing_of(path: Path, table) -> str | None:
    """The wing whose patterns match ``path`` most specifically (an exact file beats a folder pattern)."""
    rel = path.relative_to(ROOT).as_posix()
    best, best_len = None, -1
    for wing, (patterns, _) in table.items():
        for pattern in patterns:
            if fnmatch.fnmatchcase(rel, pattern) and len(pattern) > best_len:
                best, best_len = wing, len(pattern)
    return best


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports, anywhere in the file (functions and TYPE_CHECKING blocks too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package uses absolute imports"
            if node.module and node.module.split(".")[0] == "trimode":
                # `from trimode.x import y` imports module trimode.x.y if it is one, else (names in) trimode.x
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "trimode"]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


@pytest.fixture(scope="module")
def graph():
    table = layer_table()
    modules = package_modules()
    assert any(m.startswith("trimode.build.") for m in modules), "build/ was not scanned"
    return table, modules, {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_every_module_has_a_wing(graph):
    table, modules, _ = graph
    orphans = [str(p.relative_to(ROOT)) for p in modules.values() if wing_of(p, table) is None]
    assert not orphans, f"modules in no wing of the '## Layers' table of docs/architecture.md: {orphans}"


def test_imports_follow_the_layer_table(graph):
    table, modules, edges = graph
    bad = []
    for mod, targets in sorted(edges.items()):
        wing = wing_of(modules[mod], table)
        allowed = table[wing][1] | {wing}
        for target in sorted(targets):
            target_wing = wing_of(modules[target], table)
            if target_wing not in allowed:
                bad.append(f"{mod} ({wing}) imports {target} ({target_wing}); {wing} may import {sorted(allowed)}")
    assert not bad, "imports the layer table does not allow:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    _, _, edges = graph
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles between modules: {cycles}"


def test_the_table_rejects_what_it_should():
    """The checker itself: a core module importing the API, or a runtime module importing build/, is caught."""
    table = layer_table()
    core = wing_of(ROOT / "runtime" / "engine.py", table)
    api = wing_of(ROOT / "runtime" / "api.py", table)
    build = wing_of(ROOT / "build" / "pipeline.py", table)
    assert api not in table[core][1] and build not in table[api][1] and build not in table[core][1]
    assert all(build not in allowed for wing, (_, allowed) in table.items() if wing != build)
