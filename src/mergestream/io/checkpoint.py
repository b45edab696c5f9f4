"""Checkpoints opened for lazy, one-tensor-at-a-time reads.

A `TensorSource` lists tensor names and specs from file headers alone, and reads one tensor's data
only when asked. Peak memory while merging is therefore a few tensors, whatever the model size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .safetensors_stream import CODE_DTYPES, TensorSpec

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class TensorSource(Protocol):
    """A checkpoint whose tensors can be listed cheaply and read one by one."""

    description: str

    def names(self) -> list[str]:
        """Tensor names in storage order."""
        ...

    def spec(self, name: str) -> TensorSpec: ...

    def get(self, name: str) -> torch.Tensor: ...

    def files(self) -> list[Path]:
        """The files that hold the tensors (empty for in-memory sources)."""
        ...

    def close(self) -> None: ...


class MemorySource:
    """A state dict already in memory (for the Python API and tests)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "<memory>"):
        self._tensors = dict(tensors)
        self.description = description

    def names(self) -> list[str]:
        return list(self._tensors)

    def spec(self, name: str) -> TensorSpec:
        t = self._tensors[name]
        return TensorSpec(t.dtype, tuple(t.shape))

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def files(self) -> list[Path]:
        return []

    def close(self) -> None:
        pass


class SafetensorsSource:
    """One or more safetensors files (a single file or HF shards with an index)."""

    def __init__(self, files: list[Path], description: str):
        self.description = description
        self._files = files
        self._handles = []
        self._where: dict[str, int] = {}
        self._specs: dict[str, TensorSpec] = {}
        for index, path in enumerate(files):
            handle = _open_safetensors(path)
            self._handles.append(handle)
            for name in _storage_order(path, handle):
                if name in self._where:
                    raise CheckpointError(
                        f"{description}: tensor {name!r} appears in both "
                        f"{files[self._where[name]].name} and {path.name}"
                    )
                self._where[name] = index
                tensor_slice = handle.get_slice(name)
                code = tensor_slice.get_dtype()
                if code not in CODE_DTYPES:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype {code}, which mergestream cannot read"
                    )
                self._specs[name] = TensorSpec(CODE_DTYPES[code], tuple(tensor_slice.get_shape()))

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def get(self, name: str) -> torch.Tensor:
        index = self._where[name]
        try:
            return self._handles[index].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"{self._files[index]}: cannot read tensor {name!r}: {err}"
            ) from err

    def files(self) -> list[Path]:
        return list(self._files)

    def close(self) -> None:
        self._handles.clear()


def _open_safetensors(path: Path):  # noqa: ANN202 - safetensors has no public handle type
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _storage_order(path: Path, handle) -> list[str]:  # noqa: ANN001
    """Tensor names sorted by their offset in the file, so reads walk the file forward."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        return sorted(header, key=lambda n: header[n]["data_offsets"][0])
    except (OSError, ValueError, KeyError, TypeError):
        return list(handle.keys())


def resolve_checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint at `path` (a file or an HF directory)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a .safetensors file")
        return [path]
    single = path / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard {missing[0]!r} is missing")
        return [path / s for s in shards]
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise CheckpointError(
        f"{path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} found"
        + (
            f" (and {len(candidates)} other .safetensors files, which is ambiguous)"
            if candidates
            else ""
        )
    )


CheckpointLike = str | os.PathLike[str] | Mapping[str, torch.Tensor]


def open_checkpoint(checkpoint: CheckpointLike) -> TensorSource:
    """Open a checkpoint path (file or HF model directory) or wrap an in-memory state dict."""
    if isinstance(checkpoint, Mapping):
        return MemorySource(checkpoint)
    path = Path(checkpoint)
    return SafetensorsSource(resolve_checkpoint_files(path), description=str(path))


def config_dir(checkpoint: CheckpointLike) -> Path | None:
    """The HF model directory holding config/tokenizer files, if the checkpoint is one."""
    if isinstance(checkpoint, Mapping):
        return None
    path = Path(checkpoint)
    return path if path.is_dir() else None
