"""The serving package's shape: imports that only go downwards (no cycles, none hidden in function bodies),
an explicit public surface in every module, light modules that stay light, and the old flat module paths
still working, with a `DeprecationWarning`, for one release."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import transformers_alignedvq.serving as serving

PACKAGE = serving.__name__
ROOT = Path(serving.__file__).parent
MODULES = sorted(
    [PACKAGE] + [info.name for info in pkgutil.walk_packages([str(ROOT)], prefix=PACKAGE + ".")]
)
# Modules the CLI's parser, the edge or a proxy may import: no PyTorch, no Transformers.
LIGHT = [f"{PACKAGE}.{name}" for name in ("errors", "protocol", "auth", "connection_limits", "guards",
                                           "image_cache", "metrics")] + [PACKAGE]
# Where the old cycles were (server <-> vllm_engine, server <-> openai_api), and the top of the package.
HEAVY_FIRST = [f"{PACKAGE}.{name}" for name in ("engines.vllm", "openai", "runner")]


def _module_file(name: str) -> Path:
    relative = name.removeprefix(PACKAGE).lstrip(".").replace(".", "/")
    folder = ROOT / relative
    return folder / "__init__.py" if folder.is_dir() else ROOT / f"{relative}.py"


def _imported(name: str) -> set[str]:
    """Modules of the serving package that module ``name`` imports anywhere (function bodies included)."""
    is_package = _module_file(name).name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(_module_file(name).read_text())):
        if isinstance(node, ast.ImportFrom):
            anchor = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            target = f"{anchor}.{node.module}" if anchor and node.module else (node.module or anchor)
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in MODULES and c != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_in_the_serving_package():
    # The package's own lazy names are looked up on use, not imported by its modules: left out of the graph.
    graph = {name: _imported(name) - {PACKAGE} for name in MODULES}
    assert sum(map(len, graph.values())) > 20, graph  # the parser sees the package's imports
    assert f"{PACKAGE}.engines.base" in graph[f"{PACKAGE}.engines.vllm"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_engines_never_import_each_other_nor_the_app():
    for backend in ("transformers", "vllm"):
        imported = _imported(f"{PACKAGE}.engines.{backend}")
        assert not imported & {f"{PACKAGE}.engines.{other}" for other in ("transformers", "vllm")}, imported
        assert not {m for m in imported if m.split(".")[2] in ("app", "answer", "openai", "runner")}, imported


def test_engines_are_chosen_by_name_and_derive_from_the_base_only():
    from transformers_alignedvq.errors import ServerConfigError
    from transformers_alignedvq.serving.engines import ENGINES, AnswerEngine, get_engine

    assert ENGINES == ("transformers", "vllm")
    for name in ENGINES:
        engine = get_engine(name)
        assert engine.name == name and engine.__bases__ == (AnswerEngine,), engine.__mro__
    with pytest.raises(ServerConfigError, match="engine='tgi' must be one of transformers, vllm"):
        get_engine("tgi")


@pytest.mark.parametrize("module", MODULES)
def test_every_module_declares_its_public_names(module):
    loaded = importlib.import_module(module)
    assert isinstance(loaded.__all__, (list, tuple)) and loaded.__all__, module
    for name in loaded.__all__:
        assert getattr(loaded, name) is not None, f"{module}.{name}"


def _first_import(module: str) -> list[str]:
    """Import ``module`` first in a fresh interpreter; the heavy packages it loaded."""
    code = (f"import {module}, sys, json\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_first_without_torch(module):
    assert _first_import(module) == []


@pytest.mark.parametrize("module", HEAVY_FIRST)
def test_heavy_modules_import_first(module):
    assert "torch" in _first_import(module)


# Old module path -> (new module, a name to compare).
MOVED = {
    "auth": ("serving.auth", "ApiKeys"),
    "connection_limits": ("serving.connection_limits", "ConnectionLimits"),
    "http_guard": ("serving.guards", "make_server"),
    "image_cache": ("serving.image_cache", "ImageCache"),
    "openai_api": ("serving.openai", "install_openai_routes"),
    "sampling": ("serving.sampling", "SamplingOptions"),
    "server_metrics": ("serving.metrics", "install_metrics"),
    "server_schemas": ("serving.protocol", "error_responses"),
    "vllm_checkpoint": ("serving.engines.vllm_checkpoint", "export_for_vllm"),
    "vllm_engine": ("serving.engines.vllm", "VllmAnswerEngine"),
}


def _import_old(name: str):
    old = f"transformers_alignedvq.{name}"
    sys.modules.pop(old, None)  # the warning comes with the module's first import
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to transformers_alignedvq\.serving"):
        return importlib.import_module(old)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_still_work(old):
    new, name = MOVED[old]
    module = _import_old(old)
    assert getattr(module, name) is getattr(importlib.import_module(f"transformers_alignedvq.{new}"), name)


def test_old_server_module_forwards_each_name_to_its_new_home():
    from transformers_alignedvq.serving import app, batcher, errors, runner
    from transformers_alignedvq.serving.engines import transformers as engine

    server = _import_old("server")
    assert server.AnswerEngine is engine.TransformersAnswerEngine  # what the old name meant
    assert (server.create_app, server.serve, server.BackgroundServer) == (app.create_app, runner.serve,
                                                                          runner.BackgroundServer)
    assert (server.DynamicBatcher, server.ApiError) == (batcher.DynamicBatcher, errors.ApiError)
    assert server.FRAME_MEDIA_TYPE == "application/octet-stream"
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        server.nothing_here

