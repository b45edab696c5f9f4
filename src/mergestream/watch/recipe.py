"""`mergestream run recipe.yaml`: a whole merge described in one file, reproducible.

    base: base-model/                # relative paths are relative to the recipe's folder
    method: opcm
    params: {alpha: 0.5}
    state: merged.state              # optional; default: <recipe name>.state beside the recipe
    state_dtype: float64             # optional
    checkpoints:                     # merged in this order; a glob expands in name order
      - finetuned/task-a
      - finetuned/more-*
    export:                          # optional
      out: merged/
      dtype: bfloat16
      max_shard_size: 5GB

Running it again is safe: checkpoints already in the state's ledger are skipped, and a recipe
whose list no longer starts with what the state merged is refused (the merge would not be what
the recipe says). The recipe is stored in the state (`recipe.yaml`) and appended to the exported
model card, so the merged model says how to make it again.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MergestreamError
from .commands import load_yaml_mapping

RECIPE_FILE = "recipe.yaml"
KNOWN_KEYS = {"base", "method", "params", "state", "state_dtype", "checkpoints", "export"}
EXPORT_KEYS = {"out", "dtype", "max_shard_size"}
DTYPES = ("float32", "float16", "bfloat16")


def expand_checkpoints(entries: Any, folder: Path, where: Path) -> list[Path]:
    """The recipe's checkpoint list with globs expanded (by name) and paths made absolute."""
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


def _recipe(path: Path) -> dict[str, Any]:
    recipe = load_yaml_mapping(path, "recipe")
    unknown = sorted(set(recipe) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}; a recipe has {', '.join(sorted(KNOWN_KEYS))}"
        )
    for key in ("base", "checkpoints"):
        if key not in recipe:
            raise ConfigError(f"{path}: the recipe needs {key!r}")
    if not isinstance(recipe.get("params", {}) or {}, dict):
        raise ConfigError(f"{path}: 'params' must be a mapping of parameter names to values")
    export = recipe.get("export")
    if export is not None:
        if not isinstance(export, dict) or "out" not in export:
            raise ConfigError(f"{path}: 'export' must be a mapping with at least 'out'")
        unknown = sorted(set(export) - EXPORT_KEYS)
        if unknown:
            raise ConfigError(
                f"{path}: unknown export key {unknown[0]!r}; "
                f"known: {', '.join(sorted(EXPORT_KEYS))}"
            )
        if export.get("dtype") is not None and export["dtype"] not in DTYPES:
            raise ConfigError(f"{path}: export dtype must be one of {', '.join(DTYPES)}")
    return recipe


def run_recipe(path: Path, *, quiet: bool = False) -> Path:
    """Create or continue the recipe's state, merge its checkpoints in order, export; returns
    the state directory."""
    from ..progress import default_progress
    from ..state import MergeState

    path = Path(path)
    recipe = _recipe(path)
    folder = path.parent
    base = (folder / str(recipe["base"])).resolve()
    method = str(recipe.get("method", "opcm"))
    params = dict(recipe.get("params") or {})
    state_dir = folder / str(recipe.get("state") or f"{path.stem}.state")
    checkpoints = expand_checkpoints(recipe["checkpoints"], folder, path)
    progress = default_progress(quiet)

    if (state_dir / "manifest.json").is_file():
        state = MergeState.open(state_dir)
        _check_same_merge(state, base, method, params, path)
    else:
        state = MergeState.create(
            state_dir,
            base,
            method=method,
            state_dtype=recipe.get("state_dtype"),
            progress=progress,
            **params,
        )
    done = [Path(e["path"]) for e in state.ledger]
    if done != checkpoints[: len(done)]:
        raise MergestreamError(
            f"{path}: the state {state_dir} merged {[str(p) for p in done]}, which is not the "
            f"start of the recipe's checkpoint list; use a new state for this recipe"
        )
    _store_recipe(state_dir, path)
    for checkpoint in checkpoints[len(done) :]:
        stats = state.add(checkpoint, progress=progress)
        if not quiet:
            print(f"step {stats.step}: merged {checkpoint} in {stats.seconds:.2f}s", flush=True)
    export = recipe.get("export")
    if export is not None:
        out = folder / str(export["out"])
        dtype = _torch_dtype(export.get("dtype"))
        state.export(
            out,
            dtype=dtype,
            max_shard_size=export.get("max_shard_size", "5GB"),
            progress=progress,
        )
        append_recipe_to_card(out / "README.md", path)
        if not quiet:
            print(f"wrote the merged model after {state.step} steps to {out}", flush=True)
    return state_dir


def _check_same_merge(
    state: Any, base: Path, method: str, params: dict[str, Any], where: Path
) -> None:
    """Refuse to continue a state made with another base or method than the recipe's."""
    from ..methods import get_method

    status = state.status()
    wanted = get_method(method, **params)
    recorded = status["method"]
    if recorded["name"] != wanted.name or recorded["params"] != wanted.config.to_dict():
        raise MergestreamError(
            f"{where}: the existing state uses {recorded['name']} {recorded['params']}, the "
            f"recipe {wanted.name} {wanted.config.to_dict()}; use a new state for this recipe"
        )
    if Path(status["base"]).resolve() != base:
        raise MergestreamError(
            f"{where}: the existing state's base is {status['base']}, the recipe's {base}; "
            "use a new state for this recipe"
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
