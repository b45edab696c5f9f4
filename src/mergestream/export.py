"""Write merged weights: base + task vector, in the base's names, shapes and dtypes."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .io.checkpoint import TensorSource
from .io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec
from .methods.base import COMPUTE_DTYPE, TensorInfo
from .progress import NoProgress, Progress

# Files of an HF model directory that are weights (not copied next to the merged weights).
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"}
WEIGHT_INDEXES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}

TaskVectorFn = Callable[[TensorInfo], torch.Tensor]


def merged_tensors(
    base: TensorSource,
    infos: Mapping[str, TensorInfo],
    task_vector: TaskVectorFn,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) in the base's storage order, one at a time.

    Floating-point tensors become base + task vector (computed in float64, cast to `dtype` or the
    base's dtype); other tensors are the base's, unchanged.
    """
    for name in base.names():
        tensor = base.get(name)
        info = infos.get(name)
        if info is not None:
            merged = tensor.to(COMPUTE_DTYPE) + task_vector(info).to(tensor.device)
            tensor = merged.to(dtype or tensor.dtype)
        yield name, tensor


def write_safetensors(
    path: Path,
    base: TensorSource,
    infos: Mapping[str, TensorInfo],
    task_vector: TaskVectorFn,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str],
    progress: Progress | None = None,
) -> None:
    """Stream the merged model into one safetensors file at `path` (written to a temporary name
    and renamed into place, so a crash never leaves a half-written model under the final name)."""
    progress = progress or NoProgress()
    specs = []
    for name in base.names():
        spec = base.spec(name)
        out_dtype = dtype if (dtype is not None and name in infos) else spec.dtype
        specs.append((name, TensorSpec(out_dtype, spec.shape)))
    tmp = path.with_name(path.name + ".partial")
    progress.start("export", len(specs), sum(s.nbytes for _, s in specs))
    try:
        with StreamingSafetensorsWriter(tmp, specs, metadata) as writer:
            for name, tensor in merged_tensors(base, infos, task_vector, dtype):
                writer.write(name, tensor)
                progress.advance(1, tensor.numel() * tensor.element_size())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        progress.finish()
    tmp.replace(path)


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
