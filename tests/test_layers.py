"""The package's import graph: no cycles, and every layer imports only the layers below it.

The graph is read statically (ast), module-level and function-level imports alike: a lazy
import still ties the two modules together, so it cannot hide a cycle from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sinq_export"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. A module belongs to the first layer with an entry that is the module or a
# package holding it. To add a module, put it in the layer whose names it may use.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("contract", "verbosity", "interrupts", "io", "folders", "onnx_tensors", "workers",
              "heap")),
    ("sources", ("checkpoint", "gguf", "models", "data")),
    ("quant", ("quant",)),
    ("config", ("config", "presets")),
    ("quantized layer", ("linear",)),
    ("calibration", ("calibration",)),
    ("torch", ("quantize", "planning", "saved", "nn")),
    ("export", ("export", "runtime_ops")),
    ("validate/eval", ("validate", "eval")),
    ("cli", ("api", "outcome", "cli", "console", "__init__")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             modules: dict[str, Path]) -> list[str]:
    """The package's modules an import statement names (``from . import x``: module x)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                 for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        graph[name] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for t in _targets(name, is_package, node, modules)}
    return graph


def layer_of(module: str) -> tuple[int, str]:
    rel = module[len(PACKAGE) + 1:] if module != PACKAGE else "__init__"
    for rank, (layer, entries) in enumerate(LAYERS):
        if any(rel == e or rel.startswith(e + ".") for e in entries):
            return rank, layer
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_cycle():
    bad = cycles(import_graph())
    assert not bad, f"import cycles: {bad}"


def test_every_layer_imports_only_downward():
    upward = [f"{a} ({layer_of(a)[1]}) imports {b} ({layer_of(b)[1]})"
              for a, targets in sorted(import_graph().items())
              for b in sorted(targets) if layer_of(b)[0] > layer_of(a)[0]]
    assert not upward, "\n".join(upward)


def test_cycle_finder_and_lazy_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "sinq_export.api" in graph["sinq_export.cli"]  # imported inside the run functions
    assert "sinq_export.contract" in graph["sinq_export.runtime_ops"]  # ``from .. import contract``
