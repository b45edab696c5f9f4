"""Write merged weights: base + task vector, in the base's names, shapes and dtypes.

`write_model` lays the merged model out the way `save_pretrained` does: one `model.safetensors`,
or shards `model-00001-of-00003.safetensors` with a `model.safetensors.index.json` once the model
exceeds `max_shard_size`. Tensors are computed and written one at a time, and tensors past the
engine's streaming limit by row blocks (a method's task vector is elementwise in its state, so
rows of the state give rows of the task vector). The files are written into a fresh directory
that `store.atomic.publish_directory` switches in whole, so a reader of the output never sees a
half-written file or a mixture of two exports (`destination.py`). `export_model` is the whole
export of a state held still (`MergeState.export`); `check_export` its checks of OUT alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import ConfigError, MergestreamError
from ..io.checkpoint import SAFETENSORS_FILE, SAFETENSORS_INDEX
from ..io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec, dtype_name
from ..io.source import TensorSource
from ..methods.base import COMPUTE_DTYPE, TensorInfo
from ..options import DEFAULT_MAX_SHARD_SIZE
from ..progress import NoProgress, Progress
from ..step.engine import add_chunked, is_streamed, row_blocks
from ..store.generation import StateView, TaskVectorFn, TaskVectorRowsFn
from .destination import (
    MARKER,
    WEIGHT_INDEXES,
    WEIGHT_SUFFIXES,
    check_target,
    plan_output_dir,
    publish_export,
    write_json_file,
)
from .modelcard import provenance_metadata, render_model_card

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in "5GB" (10^9), "500MiB" (2^20), "1.5GB" or a plain integer, as HF writes them."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size, re.IGNORECASE)
        if not match:
            raise ConfigError(
                f"max_shard_size: expected a size such as 5GB, 500MB or 2GiB, got {size!r}"
            )
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(specs: list[tuple[str, TensorSpec]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order: a shard takes tensors until the next would push it past
    `max_shard_bytes` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def merged_tensors(
    base: TensorSource,
    infos: Mapping[str, TensorInfo],
    task_vector: TaskVectorFn,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) in the base's storage order, one at a time.

    Floating-point tensors become base + task vector (computed in float64, cast to `dtype` or the
    base's dtype); other tensors are the base's, unchanged. The base tensor is added into the
    task vector's float64 buffer, so a tensor costs one float64 copy beyond what the method
    needs to compute its task vector.
    """
    for name in base.names():
        yield name, _merged_tensor(base, name, infos.get(name), task_vector, dtype)


def _merged_tensor(
    base: TensorSource,
    name: str,
    info: TensorInfo | None,
    task_vector: TaskVectorFn,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    if info is None:
        return base.get(name)
    # The task vector first: the base tensor is read only once the method's temporaries are
    # gone, so it does not add to the peak.
    merged = add_chunked(task_vector(info).to(COMPUTE_DTYPE), base.get(name))
    return merged.to(dtype or info.dtype)


def output_specs(
    base: TensorSource, infos: Mapping[str, TensorInfo], dtype: torch.dtype | None
) -> list[tuple[str, TensorSpec]]:
    """Names and specs of the exported tensors (floating-point ones in `dtype` if given)."""
    specs = []
    for name in base.names():
        spec = base.spec(name)
        out_dtype = dtype if (dtype is not None and name in infos) else spec.dtype
        specs.append((name, TensorSpec(out_dtype, spec.shape)))
    return specs


def write_model(
    out: Path,
    base: TensorSource,
    infos: Mapping[str, TensorInfo],
    task_vector: TaskVectorFn,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
    task_vector_rows: TaskVectorRowsFn | None = None,
) -> list[str]:
    """Stream the merged model into the new, empty directory `out` as HF-style safetensors;
    returns the weight files. With `task_vector_rows` (rows `start:stop` of
    `task_vector(info)`), large tensors are written by row blocks instead of computed whole.
    Every written tensor is checked finite in its output dtype (a merged value can overflow a
    narrower dtype than the merge's float64)."""
    progress = progress or NoProgress()
    specs = output_specs(base, infos, dtype)
    spec_of = dict(specs)
    shards = plan_shards(specs, parse_size(max_shard_size))
    names = shard_file_names(len(shards))
    shard_of = {tensor: i for i, members in enumerate(shards) for tensor in members}
    writers: list[StreamingSafetensorsWriter] = []
    progress.start("export", len(specs), sum(s.nbytes for _, s in specs))
    try:
        for name, members in zip(names, shards, strict=True):
            writers.append(
                StreamingSafetensorsWriter(out / name, [(n, spec_of[n]) for n in members], metadata)
            )
        for name in base.names():
            info, writer = infos.get(name), writers[shard_of[name]]
            if info is not None and task_vector_rows is not None and is_streamed(info):
                for start, stop in row_blocks(info.shape):
                    rows = task_vector_rows(info, start, stop).to(COMPUTE_DTYPE)
                    rows.add_(base.get_rows(name, start, stop))
                    rows = rows.to(dtype or info.dtype)
                    check_output_finite(name, rows, (start, stop))
                    writer.write_rows(name, start, rows)
            else:
                merged = _merged_tensor(base, name, info, task_vector, dtype)
                if info is not None:
                    check_output_finite(name, merged, None)
                writer.write(name, merged)
            progress.advance(1, spec_of[name].nbytes)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        progress.finish()
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(spec.nbytes for spec in spec_of.values())},
            "weight_map": {
                tensor: names[i] for i, members in enumerate(shards) for tensor in members
            },
        }
        write_json_file(out / SAFETENSORS_INDEX, index)
        names = [*names, SAFETENSORS_INDEX]
    return names


def check_output_finite(
    name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None
) -> None:
    """Refuse a tensor that a cast to its output dtype made infinite (`rows` of it, if given)."""
    if bool(torch.isfinite(tensor).all()):
        return
    where = f" (rows {rows[0]}:{rows[1]})" if rows else ""
    raise MergestreamError(
        f"merged tensor {name!r}{where} is not finite in {dtype_name(tensor.dtype)}: its values "
        "exceed the dtype's range. Export it in a wider dtype (float32: `--dtype float32`, or "
        "`dtype: float32` under a recipe's `export:`)"
    )


def model_files(base_dir: Path | None) -> list[str]:
    """The base directory's files that an export copies beside the merged weights, as paths
    relative to it: config, tokenizer, and every subfolder's non-weight files
    (sentence-transformers' `1_Pooling/`, `2_Normalize/`, ...). Subfolders that `modules.json`
    names as sentence-transformers modules are taken whole, weights included (e.g. `2_Dense/`:
    modules the merge does not touch); other weight files (an `onnx/` export of the base, say)
    would not match the merged model and are left out. Hidden files and folders are skipped,
    and so is the base's README.md (the export writes its own model card)."""
    if base_dir is None:
        return []
    modules = _sentence_transformers_modules(base_dir)
    found = []
    for directory, dirs, files in os.walk(base_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        relative_dir = Path(directory).relative_to(base_dir)
        top = relative_dir == Path(".")
        whole = not top and relative_dir.parts[0] in modules
        for name in sorted(files):
            if name.startswith(".") or (top and name == "README.md"):
                continue
            is_weight = Path(name).suffix in WEIGHT_SUFFIXES or name in WEIGHT_INDEXES
            if is_weight and not whole:
                continue
            found.append(name if top else str(relative_dir / name))
    return found


def copy_model_files(base_dir: Path | None, out_dir: Path) -> list[str]:
    """Copy `model_files(base_dir)` into `out_dir` (subfolders recreated); returns them."""
    copied = model_files(base_dir)
    assert base_dir is not None or not copied
    for relative in copied:
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(base_dir / relative, target)  # type: ignore[operator]
    if base_dir is not None:  # empty module folders (2_Normalize/) matter to their loader
        for module in _sentence_transformers_modules(base_dir):
            if (base_dir / module).is_dir():
                (out_dir / module).mkdir(parents=True, exist_ok=True)
    return copied


def export_weight_names(
    base: TensorSource,
    infos: Mapping[str, TensorInfo],
    dtype: torch.dtype | None,
    max_shard_size: int | str,
) -> list[str]:
    """The weight files `write_model` will write, known before it runs."""
    count = len(plan_shards(output_specs(base, infos, dtype), parse_size(max_shard_size)))
    names = shard_file_names(count)
    return names + [SAFETENSORS_INDEX] if count > 1 else names


def _sentence_transformers_modules(base_dir: Path) -> set[str]:
    """Top-level folders that the base's `modules.json` lists as modules."""
    try:
        modules = json.loads((base_dir / "modules.json").read_text())
    except (OSError, ValueError, RecursionError):
        return set()
    if not isinstance(modules, list):
        return set()
    return {
        m["path"].split("/")[0]
        for m in modules
        if isinstance(m, dict) and isinstance(m.get("path"), str) and m["path"]
    }


def export_model(
    view: StateView,
    out: Path,
    *,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    progress: Progress | None,
    overwrite: bool,
) -> None:
    """Write the merged model of `view` to directory `out` (see `MergeState.export`): the
    weights, the base's config and tokenizer files and a model card, switched in whole."""
    infos = view.info_by_name
    written = export_files(view, dtype, max_shard_size)
    needed = sum(spec.nbytes for _, spec in output_specs(view.base, infos, dtype))

    def build(directory: Path) -> list[str]:
        files = write_model(
            directory,
            view.base,
            infos,
            view.task_vector,
            dtype,
            provenance_metadata(view.manifest),
            max_shard_size,
            progress,
            task_vector_rows=view.task_vector_rows,
        )
        copied = copy_model_files(view.base_dir, directory)
        dtypes = {dtype_name(dtype or info.dtype) for info in view.infos}
        weights = [f for f in files if f.endswith(".safetensors")]
        card = render_model_card(view.manifest, weights, "/".join(sorted(dtypes)), copied)
        (directory / "README.md").write_text(card)
        return [*files, *copied, "README.md"]

    publish_export(view, out, written, build, overwrite=overwrite, kind="model", needed=needed)


def check_export(
    view: StateView,
    out: Path,
    *,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
) -> None:
    """Refuse `out` for every reason `export_model` would, from paths and headers alone."""
    check_target(view, out)
    plan_output_dir(out, overwrite, {*export_files(view, dtype, max_shard_size), MARKER})


def export_files(view: StateView, dtype: torch.dtype | None, max_shard_size: int | str) -> set[str]:
    """The files `export_model` writes, its marker aside: the weights (one file or the shards
    and their index), the model card and the base's config and tokenizer files."""
    weight_names = export_weight_names(view.base, view.info_by_name, dtype, max_shard_size)
    return {*weight_names, "README.md", *model_files(view.base_dir)}
