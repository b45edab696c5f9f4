"""YAML read with line numbers, for the files people write by hand (suites, recipes, watch's
config): every mapping remembers the line of each key, and a key given twice is an error that
names file and line, where plain YAML would keep the last value without a word.

PyYAML is imported when a file is read, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any


class LineMap(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers its line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


def key_line(mapping: Any, key: Any = None) -> int:
    """The line of `key` in a mapping read by `line_loader` (the mapping's own line without a
    key, or when the key is absent); 0 when unknown."""
    lines = getattr(mapping, "key_lines", {})
    return int(lines.get(key, getattr(mapping, "line", 0)))


def line_loader(error: type[Exception]) -> type:
    """A safe YAML loader class whose mappings are `LineMap`s; a key given twice raises `error`
    with "NAME:LINE:" in front (NAME is the loader's `name`)."""
    import yaml

    class LineLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> LineMap:
        loader.flatten_mapping(node)
        out = LineMap()
        out.line = node.start_mark.line + 1
        out.key_lines = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in out:
                raise error(
                    f"{loader.name}:{line}: {key!r} is given twice (first on line "
                    f"{out.key_lines[key]}); give each key once"
                )
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_lines[key] = line
        return out

    LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return LineLoader


def parse_yaml(text: str, label: str, error: type[Exception]) -> Any:
    """The one document in `text`, its mappings `LineMap`s. Invalid YAML and a key given twice
    raise `error` naming `label` (the file) and the line."""
    import yaml

    loader = line_loader(error)(text)
    loader.name = label
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{label}{line}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
