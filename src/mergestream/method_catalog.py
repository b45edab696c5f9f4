"""The built-in methods' names, summaries and parameters, read from their source without torch.

`mergestream methods` is a listing; importing the methods to produce it would load torch, which
takes a second or more. Every method file declares its config as a dataclass of
`name: type = param(default, "help")` fields and its class with `name`, `summary` and
`config_class` assignments, so those facts are read from the files' syntax trees instead. A test
checks that this reading equals what the imported classes say; a method file that cannot be read
this way makes `describe_methods` return None, and the caller imports the real classes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "methods"
NOT_METHOD_FILES = {"__init__.py", "base.py", "registry.py"}


@dataclass(frozen=True)
class MethodDescription:
    name: str
    summary: str
    parameters: list[tuple[str, str, Any, str]]  # (name, type, default, help)


def describe_methods(directory: Path = HERE) -> list[MethodDescription] | None:
    """Every registered method in the package's files, sorted by name; None if any file does
    not follow the declarative form this reader understands."""
    found: list[MethodDescription] = []
    try:
        for path in sorted(directory.glob("*.py")):
            if path.name not in NOT_METHOD_FILES:
                found.extend(_describe_file(path))
    except (SyntaxError, ValueError, KeyError, OSError):
        return None
    return sorted(found, key=lambda d: d.name)


def _describe_file(path: Path) -> list[MethodDescription]:
    tree = ast.parse(path.read_text(), filename=str(path))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    aliases = _literal_aliases(tree)
    described = []
    for node in classes.values():
        if not any(_decorator_name(d) == "register_method" for d in node.decorator_list):
            continue
        assigned = _class_assignments(node)
        config = classes[assigned["config_class"].id]  # type: ignore[attr-defined]
        described.append(
            MethodDescription(
                name=ast.literal_eval(assigned["name"]),
                summary=ast.literal_eval(assigned["summary"]),
                parameters=_parameters(config, classes, aliases),
            )
        )
    return described


def _decorator_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _decorator_name(node.func)
    return None


def _class_assignments(node: ast.ClassDef) -> dict[str, ast.expr]:
    assigned: dict[str, ast.expr] = {}
    for item in node.body:
        if isinstance(item, ast.Assign) and len(item.targets) == 1:
            target = item.targets[0]
            if isinstance(target, ast.Name):
                assigned[target.id] = item.value
        elif (
            isinstance(item, ast.AnnAssign)
            and isinstance(item.target, ast.Name)
            and item.value is not None
        ):
            assigned[item.target.id] = item.value
    return assigned


def _literal_aliases(tree: ast.Module) -> dict[str, str]:
    """Module-level `Name = Literal[...]` aliases, as the listing shows them ("a|b|c")."""
    aliases = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and _is_literal(node.value):
                aliases[target.id] = _type_name(node.value, {})
    return aliases


def _is_literal(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "Literal"
    )


def _parameters(
    config: ast.ClassDef, classes: dict[str, ast.ClassDef], aliases: dict[str, str]
) -> list[tuple[str, str, Any, str]]:
    inherited: list[tuple[str, str, Any, str]] = []
    for base in config.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            inherited = _parameters(classes[base.id], classes, aliases)
    own = []
    for item in config.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        call = item.value
        if not (isinstance(call, ast.Call) and _decorator_name(call.func) == "param"):
            raise ValueError(f"{config.name}.{item.target.id}: not declared with param()")
        default = ast.literal_eval(call.args[0])
        help_text = ast.literal_eval(call.args[1]) if len(call.args) > 1 else ""
        for keyword in call.keywords:
            if keyword.arg == "help":
                help_text = ast.literal_eval(keyword.value)
        own.append((item.target.id, _type_name(item.annotation, aliases), default, help_text))
    names = {p[0] for p in own}
    return [p for p in inherited if p[0] not in names] + own


def _type_name(node: ast.expr, aliases: dict[str, str]) -> str:
    """The type as `describe_config` writes it: `float`, `str | None`, `a|b` for Literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _type_name(ast.parse(node.value, mode="eval").body, aliases)
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if _is_literal(node):
        assert isinstance(node, ast.Subscript)
        values = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return "|".join(str(ast.literal_eval(v)) for v in values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_type_name(node.left, aliases)} | {_type_name(node.right, aliases)}"
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    raise ValueError(f"unsupported annotation {ast.dump(node)}")
