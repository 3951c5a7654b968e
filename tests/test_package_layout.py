"""The package's layout holds: no import cycles anywhere in it, counting imports inside functions (which run
later, but still tie two modules together), and no module that imports a package whose `__init__` imports it
back."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "transformers_alignedvq"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        if "assets" in path.parts or "metrics" in path.parts:
            continue
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, each with the packages whose `__init__` that runs (not its own)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        for module in [target] + [f"{target}.{alias.name}" for alias in node.names]:
            parts = module.split(".")
            for end in range(2, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in edges:
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles_in_the_package():
    modules = _modules()
    edges = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "transformers_alignedvq.serving.app" in edges and edges["transformers_alignedvq.export.edge"]
    assert _cycles(edges) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
