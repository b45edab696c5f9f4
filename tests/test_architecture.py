"""The package's layout: every module imports only from its own layer or the layers below,
and no two modules import each other, directly or around a loop.

The layer order is written once, here (README's "Architecture" section draws it). Imports are
read from the source with `ast`, all of them: at module level, inside functions (imported on
first use) and under `TYPE_CHECKING`, since each is a dependency all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "mergestream"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Lowest first. A name is a top-level module or folder of the package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "errors", "options", "progress", "allocator"),  # no imports of the package
    ("io",),  # reading checkpoints and adapters
    ("methods",),  # the kernels and their torch-free configs
    ("store",),  # the state on disk: manifest, storage, hashing, atomic switches
    ("step",),  # running a step: engine, runtime, backends, prepare, plan
    ("publish",),  # what leaves a state: exports, adapters, model cards
    ("state",),  # MergeState
    ("recipe", "synthetic", "demo", "watch", "bench", "cli", "__init__", "__main__"),
)
MAX_TOP_LEVEL_MODULES = 12


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                stem = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                stem = node.module or ""
            # `from X import Y` imports the module X.Y when there is one, else X
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer; add it to LAYERS")


def test_every_module_is_in_a_layer() -> None:
    for module in _modules():
        _layer(module)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]


def _loops(graph: dict[str, set[str]]) -> list[str]:
    loops: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                loops.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return loops


def test_imports_only_go_down_or_sideways() -> None:
    assert _upward(_graph()) == []


def test_no_import_loops() -> None:
    assert _loops(_graph()) == []


def test_at_most_twelve_modules_at_the_top() -> None:
    top = sorted(path.name for path in SOURCE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..store.manifest import FORMAT\n", {"mergestream.store.manifest"}),
        ("from . import engine\n", {"mergestream.step.engine"}),
        ("def f():\n    from ..state import MergeState\n", {"mergestream.state"}),
        ("import mergestream.io.lora\n", {"mergestream.io.lora"}),
        ("from mergestream.errors import ConfigError\n", {"mergestream.errors"}),
    ],
)
def test_imports_are_read_as_written(tmp_path: Path, source: str, expected: set[str]) -> None:
    """The reader itself: relative, function-level and absolute imports all count."""
    path = tmp_path / "plan.py"
    path.write_text(source)
    known = set(_modules())
    assert _imports("mergestream.step.plan", path, known) == expected


def test_a_loop_and_an_upward_import_would_be_seen() -> None:
    """The checks can fail: an upward import and a loop in a made-up graph are reported."""
    graph = {
        "mergestream.io.open": {"mergestream.state", "mergestream.io.lora"},
        "mergestream.io.lora": {"mergestream.io.mapping"},
        "mergestream.io.mapping": {"mergestream.io.lora"},
    }
    assert _upward(graph) == ["mergestream.io.open (layer 1) imports mergestream.state (layer 6)"]
    assert _loops(graph) == ["mergestream.io.lora -> mergestream.io.mapping -> mergestream.io.lora"]
