"""`mergestream run recipe.yaml`: a whole merge described in one file, reproducible.

    base: base-model/                # relative paths are relative to the recipe's folder
    method: opcm
    params: {alpha: 0.5}
    state: merged.state              # optional; default: <recipe name>.state beside the recipe
    state_dtype: float64             # optional
    checkpoints:                     # merged in this order; a glob expands in name order
      - finetuned/task-a
      - finetuned/more-*
    strip_prefix: model.             # optional: add's options, for every checkpoint
    missing: base                    # (force_base, strip_prefix, add_prefix, missing, extra,
                                     # allow_duplicate, allow_zero)
    export:                          # optional
      out: merged/
      dtype: bfloat16
      max_shard_size: 5GB
      overwrite: true                # optional: export into a non-empty folder (as --overwrite)

Every key is checked before anything is written, and so is the export target (as `export`
checks it), so a recipe whose export would be refused merges nothing. A key given twice is an
error naming file and line. Running it again is safe: checkpoints already in the state's ledger
are skipped, and a recipe whose list no longer starts with what the state merged is refused (the
merge would not be what the recipe says). The recipe is stored in the state (`recipe.yaml`) and
appended to the exported model card, so the merged model says how to make it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, MergestreamError, warnings_as_lines
from .options import EXPORT_DTYPES, EXTRA_POLICIES, MISSING_POLICIES, STATE_DTYPE_NAMES

if TYPE_CHECKING:
    from .state import MergeState


# ------------------------------------------------------------------------------------------
# YAML read with line numbers, for the files people write by hand (recipes, watch's config,
# benchmark suites): every mapping remembers the line of each key, and a key given twice is an
# error that names file and line, where plain YAML would keep the last value without a word.
# PyYAML is imported when a file is read, so importing this module stays cheap.


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


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping, with a clear error if it does not. Its mappings
    know their keys' lines (`key_line`); a key given twice is an error naming file
    and line, since YAML alone would silently keep the last value."""
    try:
        import yaml  # noqa: F401 - only to say how to install it
    except ImportError:
        raise ConfigError(
            f"{path}: reading a {what} needs PyYAML (pip install 'mergestream[watch]')"
        ) from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    data = parse_yaml(text, str(path), ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys to values")
    return data


# ------------------------------------------------------------------------------------------
# The command line of `run` (and the fitting options `watch` shares)


def add_fitting_arguments(p: argparse.ArgumentParser) -> None:
    """`add`'s options that fit a checkpoint to the base, for every checkpoint of `run` or
    `watch`. Without defaults here, so that a value from a recipe or --config stands unless the
    flag is given."""
    group = p.add_argument_group("fitting each checkpoint's tensor names to the base's, as add")
    group.add_argument(
        "--strip-prefix", metavar="P", help="remove P from the front of the tensor names"
    )
    group.add_argument(
        "--add-prefix", metavar="P", help="put P in front of the names (after --strip-prefix)"
    )
    group.add_argument(
        "--missing",
        choices=MISSING_POLICIES,
        help="base tensors absent from a checkpoint: refuse it (error, the default) or treat "
        "them as unchanged from the base (base)",
    )
    group.add_argument(
        "--extra",
        choices=EXTRA_POLICIES,
        help="checkpoint tensors the base lacks: refuse it (error, the default) or leave them out",
    )
    group.add_argument(
        "--force-base",
        action="store_const",
        const=True,
        help="merge LoRA adapters whose base_model_name_or_path does not name the state's base "
        "(their shapes are still checked)",
    )


def add_run_command(sub: Any) -> None:
    """Add `run` to the `mergestream` subcommands."""
    p = sub.add_parser(
        "run",
        help="run a whole merge described by a recipe file (base, method, checkpoints, export)",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument(
        "--overwrite",
        action="store_const",
        const=True,
        help="export into a non-empty directory that is not an earlier export, as the recipe's "
        "'overwrite: true' under 'export:' does: only the files an export writes are replaced",
    )
    p.add_argument(
        "--allow-duplicate",
        action="store_const",
        const=True,
        help="merge a checkpoint even if identical content was merged before",
    )
    p.add_argument(
        "--allow-zero",
        action="store_const",
        const=True,
        help="merge a checkpoint whose task vector is zero in every tensor (the base itself), "
        "which still counts as a task",
    )
    add_fitting_arguments(p)  # each also a recipe key: force_base, strip_prefix, ...
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    # Flags given win over the recipe's keys of the same name; absent ones are None.
    options = {key: getattr(args, key) for key in (*ADD_KEYS, "overwrite")}
    run_recipe(Path(args.recipe), quiet=args.quiet, options=options)
    return 0


# ------------------------------------------------------------------------------------------
# Recipes


RECIPE_FILE = "recipe.yaml"
# What `add` takes to fit a checkpoint to the base or to accept it (names as MergeState.add's
# keywords and, with - for _, as add's flags); a recipe gives them once, for every checkpoint.
ADD_KEYS: dict[str, type | tuple[str, ...]] = {
    "force_base": bool,
    "strip_prefix": str,
    "add_prefix": str,
    "missing": MISSING_POLICIES,
    "extra": EXTRA_POLICIES,
    "allow_duplicate": bool,
    "allow_zero": bool,
}
KNOWN_KEYS = (
    "base",
    "method",
    "params",
    "state",
    "state_dtype",
    "checkpoints",
    *ADD_KEYS,
    "export",
)
EXPORT_KEYS = ("out", "dtype", "max_shard_size", "overwrite")
_KIND_NAMES = {bool: "true or false", str: "a string", dict: "a mapping"}


@dataclasses.dataclass
class RecipeExport:
    """The recipe's `export:` mapping, checked."""

    out: Path
    dtype: str | None
    max_shard_size: int | str
    overwrite: bool
    where: str  # "recipe.yaml:LINE" of the mapping, for messages


@dataclasses.dataclass
class Recipe:
    """A recipe file, checked, its paths made absolute."""

    path: Path
    base: Path
    method: str
    params: dict[str, Any]
    state_dir: Path
    state_dtype: str | None
    checkpoints: list[Path]
    add_options: dict[str, Any]  # keywords of MergeState.add, for every checkpoint
    export: RecipeExport | None


def _where(path: Path, mapping: Any, key: str | None = None) -> str:
    """The place of `key` in a mapping of the recipe, "FILE:LINE" (of the mapping without a
    key; "FILE" when the line is unknown)."""
    line = key_line(mapping, key)
    return f"{path}:{line}" if line else str(path)


def _value(path: Path, mapping: Mapping[str, Any], key: str, kind: type | tuple[str, ...]) -> Any:
    """`mapping[key]` (None when absent or null), checked against a type or a tuple of the
    strings it may be, with an error naming file and line."""
    value = mapping.get(key)
    if value is None:
        return None
    if isinstance(kind, tuple):
        if value not in kind:
            raise ConfigError(
                f"{_where(path, mapping, key)}: {key} must be one of {', '.join(kind)}, "
                f"got {value!r}"
            )
    # bool is an int to Python, and YAML reads `yes` as true: only the type asked for passes.
    elif not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(
            f"{_where(path, mapping, key)}: {key} must be {_KIND_NAMES[kind]}, got {value!r}"
        )
    return value


def _check_keys(path: Path, mapping: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(
                f"{_where(path, mapping, key)}: unknown {what} {key!r}; known: {', '.join(known)}"
            )


def expand_checkpoints(entries: Any, folder: Path, where: str) -> list[Path]:
    """The recipe's checkpoint list with globs expanded (by name) and paths made absolute;
    `where` ("FILE:LINE") starts every error."""
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'checkpoints' must be a path, a glob or a list of them")
    paths: list[Path] = []
    for entry in entries:
        pattern = str(folder / str(entry))
        if glob.has_magic(str(entry)):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"{where}: checkpoint pattern {entry!r} matches nothing")
            paths.extend(Path(m).resolve() for m in matches)
        else:
            path = Path(pattern)
            if not path.exists():
                raise ConfigError(f"{where}: checkpoint {entry!r} does not exist ({path})")
            paths.append(path.resolve())
    seen: set[Path] = set()
    for path in paths:
        if path in seen:
            raise ConfigError(f"{where}: checkpoint {path} is listed twice")
        seen.add(path)
    return paths


def read_recipe(path: Path, options: Mapping[str, Any] | None = None) -> Recipe:
    """Read and check a recipe file; `options` (add's options in ADD_KEYS and `overwrite`, as
    `run`'s flags give them) take the place of the recipe's. Every error names the file (and
    the line where it can)."""
    path = Path(path)
    raw = load_yaml_mapping(path, "recipe")
    _check_keys(path, raw, KNOWN_KEYS, "key")
    for key in ("base", "checkpoints"):
        if key not in raw:
            raise ConfigError(f"{path}: the recipe needs {key!r}")
    folder = path.parent
    method, params = _read_method(path, raw)
    base = _value(path, raw, "base", str)
    if not base:
        raise ConfigError(f"{_where(path, raw, 'base')}: 'base' must be the base model's path")
    if not (folder / base).exists():
        raise ConfigError(
            f"{_where(path, raw, 'base')}: base {base!r} does not exist ({folder / base})"
        )
    state = _value(path, raw, "state", str) or f"{path.stem}.state"
    flags = dict(options or {})
    overwrite = flags.pop("overwrite", None)
    add_options = {key: _value(path, raw, key, kind) for key, kind in ADD_KEYS.items()}
    add_options.update((key, value) for key, value in flags.items() if value is not None)
    return Recipe(
        path=path,
        base=(folder / base).resolve(),
        method=method,
        params=params,
        state_dir=folder / state,
        state_dtype=_value(path, raw, "state_dtype", STATE_DTYPE_NAMES),
        checkpoints=expand_checkpoints(
            raw["checkpoints"], folder, _where(path, raw, "checkpoints")
        ),
        add_options={key: value for key, value in add_options.items() if value is not None},
        export=_read_export(path, raw, overwrite),
    )


def _read_method(path: Path, raw: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The recipe's method and parameters, checked by building the method: an unknown method
    or parameter is the recipe's error, so the message says where it is."""
    from .methods import get_method

    method = _value(path, raw, "method", str) or "opcm"
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(
            f"{_where(path, raw, 'params')}: 'params' must be a mapping of parameter names to "
            "values"
        )
    try:
        known = get_method(method).config.to_dict()
    except ConfigError as err:
        raise ConfigError(f"{_where(path, raw, 'method')}: {err}") from None
    try:
        get_method(method, **params)
    except ConfigError as err:
        unknown = [key for key in params if key not in known]
        place = _where(path, params, unknown[0]) if unknown else _where(path, raw, "params")
        raise ConfigError(f"{place}: {err}") from None
    return method, dict(params)


def _read_export(path: Path, raw: Mapping[str, Any], overwrite: bool | None) -> RecipeExport | None:
    """The recipe's `export:` mapping, checked; `overwrite` (run's flag) wins over its own."""
    from .publish.export import parse_size

    export = raw.get("export")
    if export is None:
        if overwrite:
            raise ConfigError(
                f"{path}: --overwrite applies to the export, and the recipe has no 'export:'"
            )
        return None
    where = _where(path, raw, "export")
    if not isinstance(export, dict) or not _value(path, export, "out", str):
        raise ConfigError(f"{where}: 'export' must be a mapping with at least 'out' (a path)")
    _check_keys(path, export, EXPORT_KEYS, "export key")
    size = export.get("max_shard_size", "5GB")
    try:
        if isinstance(size, bool) or not isinstance(size, (int, str)):
            raise ConfigError(f"max_shard_size must be a size such as 5GB, got {size!r}")
        parse_size(size)
    except ConfigError as err:
        raise ConfigError(f"{_where(path, export, 'max_shard_size')}: {err}") from None
    given = _value(path, export, "overwrite", bool)
    return RecipeExport(
        out=path.parent / export["out"],
        dtype=_value(path, export, "dtype", EXPORT_DTYPES),
        max_shard_size=size,
        overwrite=bool(overwrite if overwrite is not None else given),
        where=where,
    )


def run_recipe(
    path: Path, *, quiet: bool = False, options: Mapping[str, Any] | None = None
) -> Path:
    """Create or continue the recipe's state, merge its checkpoints in order, export; returns
    the state directory. `options` are `run`'s flags (see `read_recipe`). The recipe, the
    state and the export target are all checked before the first step."""
    from .progress import default_progress
    from .state import MergeState

    recipe = read_recipe(Path(path), options)
    progress = default_progress(quiet)
    state: MergeState | None = None
    if (recipe.state_dir / "manifest.json").is_file():
        state = MergeState.open(recipe.state_dir)
        _check_same_merge(state, recipe)
    done = [Path(e["path"]) for e in state.ledger] if state is not None else []
    if done != recipe.checkpoints[: len(done)]:
        raise MergestreamError(
            f"{recipe.path}: the state {recipe.state_dir} merged {[str(p) for p in done]}, "
            "which is not the start of the recipe's checkpoint list; use a new state for this "
            "recipe"
        )
    if recipe.export is not None:
        # A new state is checked as it will be, from headers: nothing is hashed or written yet.
        target = state or MergeState.planned(
            recipe.state_dir,
            recipe.base,
            recipe.method,
            state_dtype=recipe.state_dtype,
            **recipe.params,
        )
        _check_export(target, recipe.export)
    if state is None:
        state = MergeState.create(
            recipe.state_dir,
            recipe.base,
            method=recipe.method,
            state_dtype=recipe.state_dtype,
            progress=progress,
            **recipe.params,
        )
    _store_recipe(recipe.state_dir, recipe.path)
    for checkpoint in recipe.checkpoints[len(done) :]:
        with warnings_as_lines() as warned:
            stats = state.add(checkpoint, progress=progress, **recipe.add_options)
        if not quiet:
            print(f"step {stats.step}: merged {checkpoint} in {stats.seconds:.2f}s", flush=True)
        for line in warned:
            print(f"mergestream: warning: {line}", file=sys.stderr, flush=True)
    export = recipe.export
    if export is not None:
        state.export(
            export.out,
            dtype=_torch_dtype(export.dtype),
            max_shard_size=export.max_shard_size,
            overwrite=export.overwrite,
            progress=progress,
        )
        append_recipe_to_card(export.out / "README.md", recipe.path)
        if not quiet:
            print(f"wrote the merged model after {state.step} steps to {export.out}", flush=True)
    return recipe.state_dir


def _check_export(state: MergeState, export: RecipeExport) -> None:
    """Refuse the recipe's export target before the first step, for what `export` would refuse
    after the merge."""
    try:
        state.check_export(
            export.out,
            dtype=_torch_dtype(export.dtype),
            max_shard_size=export.max_shard_size,
            overwrite=export.overwrite,
        )
    except MergestreamError as err:
        raise MergestreamError(
            f"{export.where}: the export target is refused, so nothing was merged: {err}"
        ) from None


def _check_same_merge(state: MergeState, recipe: Recipe) -> None:
    """Refuse to continue a state made with another base or method than the recipe's."""
    from .methods import get_method

    status = state.status()
    wanted = get_method(recipe.method, **recipe.params)
    recorded = status["method"]
    if recorded["name"] != wanted.name or recorded["params"] != wanted.config.to_dict():
        raise MergestreamError(
            f"{recipe.path}: the existing state uses {recorded['name']} {recorded['params']}, "
            f"the recipe {wanted.name} {wanted.config.to_dict()}; use a new state for this recipe"
        )
    if Path(status["base"]).resolve() != recipe.base:
        raise MergestreamError(
            f"{recipe.path}: the existing state's base is {status['base']}, the recipe's "
            f"{recipe.base}; use a new state for this recipe"
        )


def _store_recipe(state_dir: Path, recipe_path: Path) -> None:
    """Keep the recipe's text in the state, replaced atomically."""
    target = state_dir / RECIPE_FILE
    tmp = state_dir / f".{RECIPE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(recipe_path.read_text())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def append_recipe_to_card(card: Path, recipe_path: Path) -> None:
    """Add the recipe, verbatim, to the model card of an export."""
    text = recipe_path.read_text().rstrip("\n")
    fence = "````" if "```" in text else "```"
    section = (
        "\n## Recipe\n\n"
        f"Made with `mergestream run {recipe_path.name}`, from this recipe (paths relative to "
        "its folder):\n\n"
        f"{fence}yaml\n{text}\n{fence}\n"
    )
    with open(card, "a") as f:
        f.write(section)


def _torch_dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return getattr(torch, name)
