"""The house rules of vseg's imports, read from the source (imports inside functions included):

* no cycle between modules, and none between vseg's top-level packages / modules;
* the lower layers import nothing above them: config <- model <- artifacts;
* no module imports another package's private (`_name`) objects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vseg"
#: what each low layer may import from vseg (besides itself)
LAYERS = {
    "vseg.config": set(),
    "vseg.model": {"vseg.config"},
    "vseg.artifacts": {"vseg.config", "vseg.model"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The vseg module a dotted import target lives in (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, str]]:
    """(target module, imported name or '') for every `import vseg...` / `from vseg... import ...`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("vseg")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vseg"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "") if sub in MODULES else (node.module, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _ in _imports(path):
            owner = _owner(target)
            if owner and owner != module and not module.startswith(owner + "."):  # a package's own __init__
                graph[module].add(owner)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_top(module), set()).update(_top(t) for t in targets if _top(t) != _top(module))
    packages.pop("vseg", None)  # the root __init__ only re-exports the Predictor lazily
    assert _cycles(packages) == []


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_import_nothing_above_them(layer):
    allowed = LAYERS[layer] | {layer}
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if _top(module) == layer
        for target in targets
        if _top(target) not in allowed
    )
    assert wrong == []


def test_no_private_name_is_imported_across_packages():
    wrong = []
    for module, path in MODULES.items():
        for target, name in _imports(path):
            owner = _owner(target) or target
            if name.startswith("_") and _top(owner) != _top(module):
                wrong.append(f"{module}: {owner}.{name}")
    assert wrong == []


def test_the_graph_sees_real_imports():
    """Guards the walker itself: known edges of the house are found."""
    graph = _graph()
    assert "vseg.artifacts.folders" in graph["vseg.artifacts.sources"]
    assert "vseg.inference.predictor" in graph["vseg.predict"]
    assert "vseg.model.build" in graph["vseg.artifacts"]  # a package __init__ counts as a module
