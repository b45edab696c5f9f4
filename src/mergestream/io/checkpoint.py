"""A checkpoint's weight files found on disk and opened as `TensorSource`s (`source.py`).

Accepted on disk:
- a `.safetensors` file, or an HF model directory with `model.safetensors` or sharded
  `model-0000x-of-0000y.safetensors` files listed by `model.safetensors.index.json`;
- a PyTorch `.bin` / `.pt` / `.pth` state dict (the zip format `torch.save` has written since
  PyTorch 1.6), or a directory with `pytorch_model.bin` or shards listed by
  `pytorch_model.bin.index.json`. These are opened with `torch.load(mmap=True, weights_only=True)`:
  nothing is unpickled but tensors and containers, and data is read when a tensor is asked for.
  Each archive's structure is checked first (`torch_zip.py`: record sizes, tensor extents, and a
  torch recent enough that its weights-only unpickler has no known bypass).

A shard index may only name files inside its own folder (checked lexically, so symlinks in the
folder may point elsewhere, as the Hugging Face cache's do), and it must say truthfully which
shard holds each tensor. Messages name files and tensors but never quote bytes of a file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..errors import CheckpointError
from .safetensors_stream import SafetensorsFile, TensorSpec
from .torch_zip import check_torch_archive

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


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
    # The archive's structure is checked first (record sizes, tensor extents, only tensors
    # unpickled): torch.load(mmap=True) maps a truncated record without noticing.
    check_torch_archive(path, _find_state_dict)
    try:
        loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for bad files
        # torch's wording can quote bytes of the file and suggests weights_only=False: not passed on
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (torch.load failed with "
            f"{type(err).__name__} on an archive whose structure checks out)"
        ) from None
    state_dict = _find_state_dict(loaded)
    if state_dict is None:
        keys = list(loaded)[:8] if isinstance(loaded, Mapping) else []
        raise CheckpointError(
            f"{path}: holds no state dict (a mapping of names to tensors)"
            + (
                f"; its top-level keys are {_short(keys)}"
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


# An index lists one line per tensor: a few MB for the largest models.
MAX_INDEX_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class _Resolved:
    """A checkpoint found on disk: its format, its weight files and, if it came with a shard
    index, the index and its tensor -> shard map (checked against the shards once they are open)."""

    kind: str  # "safetensors" | "torch"
    files: list[Path]
    index: Path | None = None
    weight_map: dict[str, Path] | None = None


def _short(value: object, limit: int = 200) -> str:
    """repr of a value from a file, cut short: messages name things, they do not dump them."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _shard_path(index: Path, tensor: str, shard: object) -> Path:
    """The file `weight_map` names for `tensor`, refused unless it stays lexically inside the
    index's folder. Symlinks inside the folder may point anywhere (Hugging Face caches link
    shards to ../../blobs/): what is checked is the path the index wrote, not the link target."""
    if not isinstance(shard, str) or not shard or "\0" in shard:
        raise CheckpointError(
            f"{index}: not a valid checkpoint index: weight_map gives tensor {_short(tensor)} the "
            f"shard {_short(shard)}, which is not a file name"
        )
    posix, windows = PurePosixPath(shard), PureWindowsPath(shard)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(
            f"{index}: refusing shard {_short(shard)} (for tensor {_short(tensor)}): shard paths "
            f"must stay inside the checkpoint's folder {index.parent}, so absolute paths and "
            "'..' are not allowed"
        )
    return index.parent / posix


def _read_index(index: Path) -> dict[str, Path]:
    """tensor name -> shard file, from a Hugging Face shard index, every shard inside the
    index's folder and present."""
    try:
        raw = index.read_bytes() if index.stat().st_size <= MAX_INDEX_BYTES else None
    except OSError as err:
        raise CheckpointError(
            f"{index}: cannot read ({err.strerror or type(err).__name__})"
        ) from None
    if raw is None:
        raise CheckpointError(
            f"{index}: not a valid checkpoint index: larger than {MAX_INDEX_BYTES} bytes"
        )
    try:
        content = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{index}: not a valid checkpoint index: not UTF-8 text (at byte offset {err.start})"
        ) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{index}: not a valid checkpoint index: not JSON ({err.msg} at line {err.lineno}, "
            f"column {err.colno})"
        ) from None
    except RecursionError:
        raise CheckpointError(
            f"{index}: not a valid checkpoint index: its JSON is nested too deeply"
        ) from None
    expected = '(expected {"weight_map": {"tensor name": "shard file name", ...}})'
    if not isinstance(content, dict) or "weight_map" not in content:
        raise CheckpointError(f"{index}: not a valid checkpoint index: no weight_map {expected}")
    weight_map = content["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        kind = "empty" if isinstance(weight_map, dict) else f"a {type(weight_map).__name__}"
        raise CheckpointError(
            f"{index}: not a valid checkpoint index: its weight_map is {kind} {expected}"
        )
    files = {tensor: _shard_path(index, tensor, shard) for tensor, shard in weight_map.items()}
    shards = sorted(set(files.values()))
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: shard {_short(str(missing[0].relative_to(index.parent)))} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return files


def _from_index(kind: str, index: Path) -> _Resolved:
    weight_map = _read_index(index)
    return _Resolved(kind, sorted(set(weight_map.values())), index, weight_map)


def _resolve(path: Path) -> _Resolved:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _Resolved("safetensors", [path])
        if path.suffix in TORCH_SUFFIXES:
            return _Resolved("torch", [path])
        if path.name == SAFETENSORS_INDEX:
            return _from_index("safetensors", path)
        if path.name == TORCH_INDEX:
            return _from_index("torch", path)
        raise CheckpointError(
            f"{path}: expected a .safetensors, .bin, .pt or .pth file, or a model directory"
        )
    for name, kind in ((SAFETENSORS_FILE, "safetensors"), (TORCH_FILE, "torch")):
        if (path / name).is_file():
            return _Resolved(kind, [path / name])
    for name, kind in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_INDEX, "torch")):
        if (path / name).is_file():
            return _from_index(kind, path / name)
    safetensors = sorted(path.glob("*.safetensors"))
    if len(safetensors) == 1:
        return _Resolved("safetensors", safetensors)
    torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if not safetensors and len(torch_files) == 1:
        return _Resolved("torch", torch_files)
    found = len(safetensors) + len(torch_files)
    raise CheckpointError(
        f"{path}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {TORCH_INDEX} found"
        + (f" (and {found} other weight files, which is ambiguous)" if found else "")
    )


def resolve_checkpoint(path: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "torch", files) for the checkpoint at `path` (a file or a directory)."""
    resolved = _resolve(path)
    return resolved.kind, resolved.files


def _check_weight_map(index: Path, weight_map: dict[str, Path], source: _ShardedSource) -> None:
    """The index must say truthfully which shard holds each tensor: a tensor it places in the
    wrong shard, in no shard, or that it leaves out, means the index and shards do not belong
    together (mixed downloads, a hand-edited index)."""
    where = {name: source.file_of(name) for name in source.names()}

    def shard(file: Path) -> str:
        return _short(str(file.relative_to(index.parent)))

    problems: list[str] = []
    for tensor, file in weight_map.items():
        held = where.get(tensor)
        if held is None:
            problems.append(
                f"it places tensor {_short(tensor)} in shard {shard(file)}, but no shard it "
                "lists holds it"
            )
        elif held != file:
            problems.append(
                f"it places tensor {_short(tensor)} in shard {shard(file)}, but shard "
                f"{shard(held)} holds it"
            )
    for tensor, held in where.items():
        if tensor not in weight_map:
            problems.append(
                f"shard {shard(held)} holds tensor {_short(tensor)}, which it does not list"
            )
    if problems:
        more = f" (and {len(problems) - 1} more such problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"{index}: the index does not match its shards: {problems[0]}{more}")


def resolve_checkpoint_files(path: Path) -> list[Path]:
    """The weight files that make up the checkpoint at `path` (a file or an HF directory)."""
    return resolve_checkpoint(path)[1]


def open_weight_files(path: Path) -> SafetensorsSource | TorchSource:
    """Open the weight files of the checkpoint at `path` (a file, an HF model directory or a
    shard index), checking a shard index against its shards."""
    resolved = _resolve(path)
    source: SafetensorsSource | TorchSource
    if resolved.kind == "torch":
        source = TorchSource(resolved.files, description=str(path))
    else:
        source = SafetensorsSource(resolved.files, description=str(path))
    if resolved.index is not None and resolved.weight_map is not None:
        try:
            _check_weight_map(resolved.index, resolved.weight_map, source)
        except BaseException:
            source.close()
            raise
    return source
