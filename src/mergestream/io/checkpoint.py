"""Checkpoints opened for lazy, one-tensor-at-a-time reads.

A `TensorSource` lists tensor names and specs from file headers alone, and reads one tensor's data
only when asked. Peak memory while merging is therefore a few tensors, whatever the model size.

Accepted on disk:
- a `.safetensors` file, or an HF model directory with `model.safetensors` or sharded
  `model-0000x-of-0000y.safetensors` files listed by `model.safetensors.index.json`;
- a PyTorch `.bin` / `.pt` / `.pth` state dict (the zip format `torch.save` has written since
  PyTorch 1.6), or a directory with `pytorch_model.bin` or shards listed by
  `pytorch_model.bin.index.json`. These are opened with `torch.load(mmap=True, weights_only=True)`:
  nothing is unpickled but tensors and containers, and data is read when a tensor is asked for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CheckpointError
from .safetensors_stream import SafetensorsFile, TensorSpec

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class TensorSource(Protocol):
    """A checkpoint whose tensors can be listed cheaply and read one by one."""

    description: str

    def names(self) -> list[str]:
        """Tensor names in storage order."""
        ...

    def spec(self, name: str) -> TensorSpec: ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a tensor (first dimension), reading no more than those."""
        ...

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

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name].detach()[start:stop]

    def files(self) -> list[Path]:
        return []

    def close(self) -> None:
        pass


class _ShardedSource:
    """Shared bookkeeping of file-backed sources: which file holds which tensor."""

    description: str

    def __init__(self, files: list[Path], description: str):
        self.description = description
        self._files = files
        self._where: dict[str, int] = {}
        self._specs: dict[str, TensorSpec] = {}

    def _register(self, index: int, name: str, spec: TensorSpec) -> None:
        if name in self._where:
            raise CheckpointError(
                f"{self.description}: tensor {name!r} appears in both "
                f"{self._files[self._where[name]].name} and {self._files[index].name}"
            )
        self._where[name] = index
        self._specs[name] = spec

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def files(self) -> list[Path]:
        return list(self._files)

    def file_of(self, name: str) -> Path:
        """The file that holds tensor `name` (for error messages)."""
        return self._files[self._where[name]]


class SafetensorsSource(_ShardedSource):
    """One or more safetensors files (a single file or HF shards with an index)."""

    def __init__(self, files: list[Path], description: str):
        super().__init__(files, description)
        self._handles: list[SafetensorsFile] = []
        try:
            for index, path in enumerate(files):
                handle = SafetensorsFile(path)
                self._handles.append(handle)
                for name in handle.names():
                    self._register(index, name, handle.spec(name))
        except BaseException:
            self.close()
            raise

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].read(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._handles[self._where[name]].read_rows(name, start, stop)

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()


class TorchSource(_ShardedSource):
    """One or more PyTorch state-dict files, memory-mapped by `torch.load(mmap=True)`.

    `get` copies a tensor out of the mapping and then tells the kernel that the process no longer
    needs the mapped pages (`madvise(MADV_DONTNEED)`): mapped pages that were read otherwise stay
    in the resident set, and a pass over the checkpoint would grow the process by its size.
    """

    def __init__(self, files: list[Path], description: str):
        super().__init__(files, description)
        self._dicts: list[Mapping[str, torch.Tensor]] = []
        for index, path in enumerate(files):
            state_dict = _load_state_dict(path)
            self._dicts.append(state_dict)
            for name, tensor in state_dict.items():
                self._register(index, name, TensorSpec(tensor.dtype, tuple(tensor.shape)))

    def get(self, name: str) -> torch.Tensor:
        return self._copy_out(name, self._dicts[self._where[name]][name])

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._copy_out(name, self._dicts[self._where[name]][name][start:stop])

    def _copy_out(self, name: str, mapped: torch.Tensor) -> torch.Tensor:
        try:
            tensor = torch.empty(mapped.shape, dtype=mapped.dtype).copy_(mapped)
        except RuntimeError as err:  # e.g. the file shrank after it was mapped
            raise CheckpointError(
                f"{self.file_of(name)}: cannot read tensor {name!r} ({err})"
            ) from None
        _release_pages(mapped)
        return tensor

    def close(self) -> None:
        self._dicts.clear()


def _load_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for bad files
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if "mmap" in text or "zipfile" in text.lower() or "zip archive" in text.lower():
            hint = (
                "; mergestream reads the zip format that torch.save writes by default since "
                "PyTorch 1.6 (re-save it with torch.save, or convert it to safetensors)"
            )
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({text}){hint}") from None
    state_dict = _find_state_dict(loaded)
    if state_dict is None:
        keys = list(loaded)[:8] if isinstance(loaded, Mapping) else []
        raise CheckpointError(
            f"{path}: holds no state dict (a mapping of names to tensors)"
            + (
                f"; its top-level keys are {keys}"
                if keys
                else f"; it holds a {type(loaded).__name__}"
            )
        )
    return state_dict


def _find_state_dict(loaded: object) -> Mapping[str, torch.Tensor] | None:
    """The names -> tensors mapping of a loaded file: the file itself, or the usual wrappers
    (`{"state_dict": ...}`, `{"model": ...}`) that training loops save."""
    if not isinstance(loaded, Mapping) or not loaded:
        return None
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        return loaded
    for key in ("state_dict", "model_state_dict", "model", "module"):
        inner = loaded.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inner.items())
        ):
            return inner
    return None


def _madvise():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()
_MADV_DONTNEED = 4


def _release_pages(mapped: torch.Tensor) -> None:
    """Drop the process's mapping of the pages that hold `mapped` (they are clean file pages that
    the kernel reads again if touched), so that reading a mapped file does not grow the process."""
    if _MADVISE is None or mapped.numel() == 0:
        return
    span = 1 + sum(
        (size - 1) * stride for size, stride in zip(mapped.shape, mapped.stride(), strict=True)
    )
    start = mapped.data_ptr()
    end = start + span * mapped.element_size()
    page = mmap.PAGESIZE
    aligned = start - start % page
    _MADVISE(aligned, end - aligned, _MADV_DONTNEED)


# ------------------------------------------------------------------------------ finding files


def _read_index(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not shards or not all(isinstance(s, str) for s in shards):
            raise ValueError("empty or malformed weight_map")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a valid checkpoint index ({err})") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: shard {missing[0]!r} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return shards


def resolve_checkpoint(path: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "torch", files) for the checkpoint at `path` (a file or a directory)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors", [path]
        if path.suffix in TORCH_SUFFIXES:
            return "torch", [path]
        if path.name == SAFETENSORS_INDEX:
            return "safetensors", [path.parent / s for s in _read_index(path)]
        if path.name == TORCH_INDEX:
            return "torch", [path.parent / s for s in _read_index(path)]
        raise CheckpointError(
            f"{path}: expected a .safetensors, .bin, .pt or .pth file, or a model directory"
        )
    for name, kind in ((SAFETENSORS_FILE, "safetensors"), (TORCH_FILE, "torch")):
        if (path / name).is_file():
            return kind, [path / name]
    for name, kind in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_INDEX, "torch")):
        if (path / name).is_file():
            return kind, [path / s for s in _read_index(path / name)]
    safetensors = sorted(path.glob("*.safetensors"))
    if len(safetensors) == 1:
        return "safetensors", safetensors
    torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if not safetensors and len(torch_files) == 1:
        return "torch", torch_files
    found = len(safetensors) + len(torch_files)
    raise CheckpointError(
        f"{path}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {TORCH_INDEX} found"
        + (f" (and {found} other weight files, which is ambiguous)" if found else "")
    )


def resolve_checkpoint_files(path: Path) -> list[Path]:
    """The weight files that make up the checkpoint at `path` (a file or an HF directory)."""
    return resolve_checkpoint(path)[1]


CheckpointLike = str | os.PathLike[str] | Mapping[str, torch.Tensor]


def open_checkpoint(checkpoint: CheckpointLike) -> TensorSource:
    """Open a checkpoint path (file or HF model directory) or wrap an in-memory state dict."""
    if isinstance(checkpoint, Mapping):
        return MemorySource(checkpoint)
    path = Path(checkpoint)
    from .lora import is_adapter_dir, open_adapter  # (lora imports this module)

    if is_adapter_dir(path):  # a PEFT LoRA adapter: fitted to the base by MergeState
        return open_adapter(path)
    kind, files = resolve_checkpoint(path)
    if kind == "torch":
        return TorchSource(files, description=str(path))
    return SafetensorsSource(files, description=str(path))


def config_dir(checkpoint: CheckpointLike) -> Path | None:
    """The HF model directory holding config/tokenizer files, if the checkpoint is one."""
    if isinstance(checkpoint, Mapping):
        return None
    path = Path(checkpoint)
    if path.is_dir():
        return path
    if path.name in (SAFETENSORS_INDEX, TORCH_INDEX):
        return path.parent
    return None


def tensor_location(source: TensorSource, name: str) -> str:
    """Where tensor `name` lives, for messages: its file if the source knows it."""
    file_of = getattr(source, "file_of", None)
    if file_of is not None:
        try:
            return str(file_of(name))
        except KeyError:
            pass
    return source.description
