"""The package's floors only look down: no import climbs a floor, none closes a cycle.

The floor map is ``pyllama_ernie/_architecture.py``; the README's Architecture
section is its :func:`render` output. Read from the source with ``ast`` (lazy
imports inside functions count too), so this needs no build.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "pyllama_ernie"


def _load_map():
    spec = importlib.util.spec_from_file_location("_architecture", PKG / "_architecture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


arch = _load_map()


def _top(name: str) -> str:
    return name.split(".")[0]


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports (top-level names under pyllama_ernie, e.g. "model", "convert")."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_wing = path.parent.name == arch.WING
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("pyllama_ernie"):
                    rest = node.module.split(".")[1:]
                    out.update([rest[0]] if rest else [a.name for a in node.names])
                continue
            base_is_pkg = node.level == 1 and not in_wing or node.level == 2 and in_wing
            if in_wing and node.level == 1:
                out.add(arch.WING)  # inside the wing
            elif base_is_pkg:
                out.update([_top(node.module)] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pyllama_ernie."):
                    out.add(a.name.split(".")[1])
    return out


def graph() -> dict[str, set[str]]:
    """module -> modules it imports, for the runtime modules and the wing (as one node)."""
    g: dict[str, set[str]] = {}
    for f in sorted(PKG.glob("*.py")):
        g[f.stem] = imports_of(f) - {f.stem}
    wing: set[str] = set()
    for f in sorted((PKG / arch.WING).rglob("*.py")):
        wing |= imports_of(f)
    g[arch.WING] = wing - {arch.WING}
    return g


def test_every_module_has_a_floor():
    g = graph()
    missing = sorted(m for m in g if m != arch.WING and m not in arch.FLOORS)
    assert not missing, f"put these modules on a floor in pyllama_ernie/_architecture.py: {missing}"
    stale = sorted(m for m in arch.FLOORS if m not in g and m != "_cffi" and m != "_build_info")
    assert not stale, f"the floor map names modules that do not exist: {stale}"


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        for dep in sorted(deps):
            if mod == arch.WING:
                if dep not in arch.WING_MAY_IMPORT:
                    bad.append(f"{arch.WING}/ imports {dep} (it may import only {arch.WING_MAY_IMPORT})")
                continue
            floor = arch.FLOORS[mod][0]
            if dep == arch.WING:
                if floor != max(f for f, _ in arch.FLOORS.values()):
                    bad.append(f"{mod} (floor {floor}) imports {arch.WING}/ (only the apps may)")
                continue
            if dep not in arch.FLOORS:
                bad.append(f"{mod} imports {dep}, which has no floor")
            elif arch.FLOORS[dep][0] > floor:
                bad.append(f"{mod} (floor {floor}) imports {dep} (floor {arch.FLOORS[dep][0]})")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_climbs_a_floor():
    assert upward_imports(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_can_fail():
    """The checks see an upward import and a cycle when there is one."""
    g = graph()
    g["values"] = g["values"] | {"model"}
    assert any("values (floor 0) imports model" in b for b in upward_imports(g))
    assert any("values" in c and "model" in c for c in cycles(g))
    g2 = graph()
    g2[arch.WING] = g2[arch.WING] | {"model"}
    assert upward_imports(g2)


def test_lazy_imports_count(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from .model import Model\n    from . import chat, _lib as L\n")
    assert imports_of(src) == {"model", "chat", "_lib"}


def test_readme_architecture_is_the_floor_map():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- architecture:begin -->", "<!-- architecture:end -->"
    assert begin in readme and end in readme, "README.md needs the generated Architecture block"
    block = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert block == arch.render(), ("README's Architecture block is stale: replace it with the output of "
                                    "`python pyllama_ernie/_architecture.py`")


@pytest.mark.parametrize("module", ["model", "context", "multimodal"])
def test_the_map_knows_the_core(module):
    assert module in arch.FLOORS
