"""Write merged weights: base + task vector, in the base's names, shapes and dtypes.

`write_model` lays the merged model out the way `save_pretrained` does: one `model.safetensors`,
or shards `model-00001-of-00003.safetensors` with a `model.safetensors.index.json` once the model
exceeds `max_shard_size`. Tensors are computed and written one at a time, and tensors past the
engine's streaming limit by row blocks (a method's task vector is elementwise in its state, so
rows of the state give rows of the task vector). Every file is written
under a temporary name and renamed into place only when all shards are complete, so a crash never
leaves a half-written file under a name a loader reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .engine import add_chunked, is_streamed, row_blocks
from .errors import ConfigError, MergestreamError
from .io.checkpoint import SAFETENSORS_FILE, SAFETENSORS_INDEX, TensorSource
from .io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from .methods.base import COMPUTE_DTYPE, TensorInfo
from .progress import NoProgress, Progress
from .storage import fsync_dir

# Files of an HF model directory that are weights (not copied next to the merged weights).
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"}
WEIGHT_INDEXES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
PARTIAL = ".partial"
DEFAULT_MAX_SHARD_SIZE = "5GB"

TaskVectorFn = Callable[[TensorInfo], torch.Tensor]
TaskVectorRowsFn = Callable[[TensorInfo, int, int], torch.Tensor]

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


def check_output_dir(out: Path) -> None:
    """Refuse a directory holding weights that an export would not replace (the merged model
    would be ambiguous next to them)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MergestreamError(f"{out}: exists and is not a directory")
    for item in sorted(out.iterdir()):
        if not item.is_file() or _is_export_weight(item.name) or item.name.endswith(PARTIAL):
            continue
        if item.suffix in WEIGHT_SUFFIXES or item.name in WEIGHT_INDEXES:
            raise MergestreamError(
                f"{out}: holds {item.name}, which an export would not replace; a loader could "
                "pick it instead of the merged weights. Export into an empty or new directory"
            )


def _is_export_weight(name: str) -> bool:
    return name in (SAFETENSORS_FILE, SAFETENSORS_INDEX) or SHARD_NAME.fullmatch(name) is not None


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
    """Stream the merged model into `out` as HF-style safetensors; returns the weight files.
    With `task_vector_rows` (rows `start:stop` of `task_vector(info)`), large tensors are
    written by row blocks instead of computed whole."""
    progress = progress or NoProgress()
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = output_specs(base, infos, dtype)
    spec_of = dict(specs)
    shards = plan_shards(specs, parse_size(max_shard_size))
    names = shard_file_names(len(shards))
    shard_of = {tensor: i for i, members in enumerate(shards) for tensor in members}
    partials = [out / (name + PARTIAL) for name in names]
    writers: list[StreamingSafetensorsWriter] = []
    progress.start("export", len(specs), sum(s.nbytes for _, s in specs))
    try:
        for path, members in zip(partials, shards, strict=True):
            writers.append(
                StreamingSafetensorsWriter(path, [(n, spec_of[n]) for n in members], metadata)
            )
        for name in base.names():
            info, writer = infos.get(name), writers[shard_of[name]]
            if info is not None and task_vector_rows is not None and is_streamed(info):
                for start, stop in row_blocks(info.shape):
                    rows = task_vector_rows(info, start, stop).to(COMPUTE_DTYPE)
                    rows.add_(base.get_rows(name, start, stop))
                    writer.write_rows(name, start, rows.to(dtype or info.dtype))
            else:
                writer.write(name, _merged_tensor(base, name, info, task_vector, dtype))
            progress.advance(1, spec_of[name].nbytes)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        for path in partials:
            path.unlink(missing_ok=True)
        raise
    finally:
        progress.finish()
    _install(out, names, partials, spec_of, shards)
    return names


def _install(
    out: Path,
    names: list[str],
    partials: list[Path],
    spec_of: Mapping[str, TensorSpec],
    shards: list[list[str]],
) -> None:
    """Move complete shards into place and leave no weights of an earlier export behind."""
    index = out / SAFETENSORS_INDEX
    stale = [
        item
        for item in out.iterdir()
        if item.is_file() and _is_export_weight(item.name) and item.name not in names
    ]
    if len(names) == 1:
        index.unlink(missing_ok=True)  # first, so no index points at shards being replaced
    for partial, name in zip(partials, names, strict=True):
        partial.replace(out / name)
    if len(names) > 1:
        tmp = out / (SAFETENSORS_INDEX + PARTIAL)
        content = {
            "metadata": {"total_size": sum(spec.nbytes for spec in spec_of.values())},
            "weight_map": {
                tensor: names[i] for i, members in enumerate(shards) for tensor in members
            },
        }
        with open(tmp, "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(index)
    for item in stale:
        if item != index:
            item.unlink(missing_ok=True)
    fsync_dir(out)


def copy_model_files(base_dir: Path | None, out_dir: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of an HF model directory."""
    if base_dir is None:
        return []
    copied = []
    for item in sorted(base_dir.iterdir()):
        if not item.is_file() or item.suffix in WEIGHT_SUFFIXES or item.name in WEIGHT_INDEXES:
            continue
        if item.name == "README.md":
            continue  # the export writes its own model card
        shutil.copy2(item, out_dir / item.name)
        copied.append(item.name)
    return copied
