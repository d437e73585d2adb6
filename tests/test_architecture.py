"""The boundaries of docs/architecture.md, checked on the source: ``knet`` imports no Ray or MLflow; in
``knet_platform`` only the adapter module imports ``knet``; platform imports form no cycle.

Every import counts: module level, inside functions and under ``TYPE_CHECKING``, because each of them
is a dependency a reader has to follow (and a function-local import is how a cycle hides).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]
ADAPTER = "knet_platform.knet_adapter"


def _module_name(path: Path) -> str:
    """``platform/train/worker.py`` -> ``knet_platform.train.worker`` (``knet/...`` as it is)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "platform":
        parts[0] = "knet_platform"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources(folder: str) -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((ROOT / folder).rglob("*.py"))}


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, anywhere in the file; ``from a import b`` counts as ``a.b`` when
    ``a.b`` is a module, else as ``a``."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _platform_graph() -> dict[str, set[str]]:
    modules = _sources("platform")
    return {
        name: {target for target in _imports(path, name) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_knet_imports_neither_ray_nor_mlflow() -> None:
    offenders = {
        name: sorted(t for t in _imports(path, name) if t.split(".")[0] in ("ray", "mlflow", "knet_platform"))
        for name, path in _sources("knet").items()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_only_the_adapter_imports_knet_in_the_platform() -> None:
    importers = {
        name
        for name, path in _sources("platform").items()
        if any(target == "knet" or target.startswith("knet.") for target in _imports(path, name))
    }
    assert importers == {ADAPTER}


def test_platform_imports_form_no_cycle() -> None:
    graph = _platform_graph()
    cycles = _cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    seen_in_cycle: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1 and target not in seen_in_cycle:
                cycle = path[path.index(target) :] + [target]
                seen_in_cycle.update(cycle)
                found.append(cycle)
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found
