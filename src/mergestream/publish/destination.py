"""Where an export goes, and the rules every export shares (a full model or an adapter).

An export directory is new, empty, or an earlier export: its marker (`MARKER`) lists the files
that export wrote, which the next one replaces; every other file is kept. A directory holding
other files is refused unless `overwrite`. It may never be, hold or lie in the state or the
base's files. The new files are written into a fresh directory beside it that
`store.atomic.publish_directory` switches in whole, so a reader sees one export or the other.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import MergestreamError
from ..store.atomic import files_under, publish_directory
from ..store.generation import StateView
from ..store.storage import no_space_message

# Files of an HF model directory that are weights (not copied next to the merged weights).
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"}
WEIGHT_INDEXES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


MARKER = ".mergestream-export.json"  # what an export wrote, so the next one knows what it owns


def read_marker(out: Path) -> dict[str, Any] | None:
    """The record a previous export left in `out`, or None if `out` is not an export."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != "mergestream-export":
        return None
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return marker


def plan_output_dir(out: Path, overwrite: bool, written: set[str]) -> list[str]:
    """Check that an export may replace directory `out`, and return the files of `out` to keep.

    A previous export's own files (its marker lists them) are replaced; every other file of
    `out` is kept. A non-empty `out` that is not a previous export is refused unless
    `overwrite`, and even then only the files an export writes are replaced. Weights that the
    export would not replace are refused (a loader could pick them instead of the merged
    model)."""
    if not out.exists() and not out.is_symlink():
        return []
    if not out.is_dir():
        raise MergestreamError(f"{out}: exists and is not a directory")
    present = files_under(out)
    if not present:
        return []
    marker = read_marker(out)
    owned = set(marker["files"]) | {MARKER} if marker is not None else set()
    foreign = [f for f in present if f not in owned]
    if marker is None and not overwrite:
        shown = ", ".join(foreign[:4]) + (
            f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        )
        raise MergestreamError(
            f"{out}: is not empty ({shown}) and was not written by mergestream export; export "
            "into a new or empty directory, or pass overwrite (--overwrite) to replace only the "
            "files an export writes there and keep the others"
        )
    keep = [f for f in foreign if f not in written]
    for relative in keep:
        name = Path(relative).name
        if "/" not in relative and (Path(name).suffix in WEIGHT_SUFFIXES or name in WEIGHT_INDEXES):
            raise MergestreamError(
                f"{out}: holds {relative}, which an export would not replace; a loader could "
                "pick it instead of the merged weights. Move it away, or export into an empty "
                "or new directory"
            )
    return keep


def write_json_file(path: Path, content: Any) -> None:
    """Write JSON to a new file and fsync it."""
    with open(path, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())



def check_target(view: StateView, out: Path) -> None:
    """Refuse an `out` whose replacement would touch the state or the base's files: `out`
    may be none of them nor hold one, and may not lie inside the state directory."""
    target = Path(os.path.realpath(out))
    state_dir = Path(os.path.realpath(view.state_dir)) if view.state_dir is not None else None
    if state_dir is not None and state_dir in target.parents:
        raise MergestreamError(f"{out}: cannot export into the state directory")
    protected: list[tuple[Path, str]] = []
    if state_dir is not None:
        protected.append((state_dir, "the state directory"))
    if view.base_dir is not None:
        protected.append((Path(os.path.realpath(view.base_dir)), "the base model's directory"))
    for file in view.base.files():
        protected.append((Path(os.path.realpath(file.parent)), "the base model's directory"))
        protected.append((Path(os.path.realpath(file)), f"the base's file {file}"))
    for path, what in protected:
        if target == path or target in path.parents:
            raise MergestreamError(
                f"{out}: cannot export there: it would replace {what}; choose another "
                "output directory"
            )


def publish_export(
    view: StateView,
    out: Path,
    written: set[str],
    build: Callable[[Path], list[str]],
    *,
    overwrite: bool,
    kind: str,
    needed: int | None = None,
) -> None:
    """Publish an export of this state (a full model, or an adapter) as directory `out`,
    under the rules every export shares; `view` is the state held still (`reading()`).

    `out` may not be, hold or lie in the state or the base's files, and must be new, empty
    or an earlier export of either kind (its marker lists the files it wrote, which are
    replaced); another non-empty directory is refused unless `overwrite`. `written` names in
    advance the files `build` may write, `build(directory)` writes them into a fresh
    directory beside `out` and returns them; the marker listing them is added and the
    directory switched in whole. On any failure `out` is as it was; `needed` (bytes) goes
    into the message when the disk is full."""
    check_target(view, out)
    keep = plan_output_dir(out, overwrite, {*written, MARKER})

    def build_with_marker(directory: Path) -> None:
        files = build(directory)
        marker = {
            "format": "mergestream-export",
            "kind": kind,
            "mergestream_version": __version__,
            "state": view.where,
            "step": view.step,
            "files": sorted(set(files)),
        }
        write_json_file(directory / MARKER, marker)

    try:
        publish_directory(out, build_with_marker, keep)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MergestreamError(
                no_space_message(out.parent, "the export", needed) + f"; {out} is unchanged"
            ) from None
        raise MergestreamError(
            f"{out}: cannot write the export ({err.strerror or err}); {out} is unchanged"
        ) from None
