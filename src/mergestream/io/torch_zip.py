"""Structural checks of a `torch.save` zip archive before torch memory-maps it.

`torch.load(mmap=True)` trusts the archive: a storage record shorter than the tensor data the
pickle declares for it is mapped anyway, and the tensor silently takes its bytes from whatever
follows in the file. So before the real load, this module

- opens the zip directory (`zipfile`, no data read) and refuses an empty file, a file in the
  legacy pre-1.6 format, a truncated or corrupt archive, and compressed records;
- unpickles `data.pkl` with torch's own weights-only unpickler, answering every storage reference
  with a meta-device storage of the declared size: nothing but tensors and plain containers is
  unpickled, and no tensor data is read;
- checks every referenced storage record against the zip directory (present, stored
  uncompressed, exactly numel × element size bytes, lying inside the file), and every tensor's
  extent (offset, sizes, strides) against the size of its storage.

Every refusal is a `CheckpointError` naming the file, and the tensor where one is at fault. The
messages never quote bytes of the file: a path that should not have been opened must not leak.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._weights_only_unpickler as weights_only_unpickler

from ..errors import CheckpointError

# Versions before this one have published bypasses of `torch.load(weights_only=True)`:
# CVE-2025-32434 (fixed in 2.6) and CVE-2026-24747 (fixed in 2.10).
SAFE_PICKLE_TORCH = (2, 10)

# data.pkl holds only the structure (names, shapes, storage keys): a few MB for the largest
# models. A bigger one is not a checkpoint this reader should spend memory on.
MAX_PICKLE_BYTES = 256 * 1024 * 1024

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name and extra lengths
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
# The pre-1.6 torch.save format: pickle protocol 2, then the format's magic number as a LONG1.
_LEGACY_TORCH_START = b"\x80\x02\x8a\x0a"
_PICKLE_START = b"\x80"  # the PROTO opcode that starts every pickle of protocol 2 or later


def torch_version() -> tuple[int, int] | None:
    """(major, minor) of the installed torch, or None if its version string is unusual."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch_reads_pickles_safely(path: Path) -> None:
    """Refuse to unpickle anything with a torch whose weights-only unpickler can be bypassed."""
    version = torch_version()
    if version is not None and version >= SAFE_PICKLE_TORCH:
        return
    floor = ".".join(map(str, SAFE_PICKLE_TORCH))
    raise CheckpointError(
        f"{path}: refusing to read a PyTorch pickle checkpoint with torch {torch.__version__}: "
        f"before torch {floor}, a crafted .bin/.pt file can run code even with "
        "torch.load(weights_only=True) (CVE-2025-32434, CVE-2026-24747). Upgrade torch to "
        f"{floor} or later, or convert the checkpoint to safetensors with a current torch on a "
        "machine you trust; safetensors checkpoints are read with any torch >= 2.1"
    )


@dataclass
class _Storage:
    """One storage the pickle refers to: its record key and the bytes it declares."""

    key: str
    nbytes: int
    tensors: list[str] = field(default_factory=list)  # state-dict names that view it


def check_torch_archive(
    path: Path, find_state_dict: Callable[[object], Mapping[str, torch.Tensor] | None]
) -> None:
    """Check the archive at `path` as the module docstring says; raise `CheckpointError`.

    `find_state_dict` picks the names -> tensors mapping out of the unpickled object (the same
    rule the real load uses), so that messages can name tensors.
    """
    check_torch_reads_pickles_safely(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            start = handle.read(4)
            if file_size == 0:
                raise CheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint")
            archive = _open_zip(path, handle, start)
            with archive:
                _check_archive(path, handle, file_size, archive, find_state_dict)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except OSError as err:
        raise CheckpointError(
            f"{path}: cannot read ({err.strerror or type(err).__name__})"
        ) from None


def _open_zip(path: Path, handle: io.BufferedReader, start: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):
        pass
    if start.startswith(_LEGACY_TORCH_START):
        reason = (
            "it is in the legacy format of PyTorch before 1.6; mergestream reads the zip format "
            "that torch.save writes by default since PyTorch 1.6 (re-save it with torch.save, or "
            "convert it to safetensors)"
        )
    elif start.startswith(_PICKLE_START):
        reason = (
            "it is a plain pickle, not the zip archive that torch.save writes (since PyTorch "
            "1.6); re-save the state dict with torch.save, or convert it to safetensors"
        )
    elif start.startswith(_LOCAL_HEADER_SIGNATURE):
        reason = (
            "it is a truncated or corrupt zip archive (its zip directory is missing or "
            "unreadable); was it copied or downloaded completely?"
        )
    else:
        reason = "it is not a zip archive (torch.save writes the zip format since PyTorch 1.6)"
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {reason}")


def _check_archive(
    path: Path,
    handle: io.BufferedReader,
    file_size: int,
    archive: zipfile.ZipFile,
    find_state_dict: Callable[[object], Mapping[str, torch.Tensor] | None],
) -> None:
    entries = archive.infolist()
    if not entries:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: the zip archive is empty")
    # torch reads the records under the folder of the archive's first entry
    prefix = entries[0].filename.split("/", 1)[0]
    records = {info.filename: info for info in entries}
    pickle_info = records.get(f"{prefix}/data.pkl")
    if pickle_info is None:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint: the zip archive has no {prefix}/data.pkl record"
        )
    _check_record_bounds(path, handle, file_size, pickle_info, "its data.pkl record")
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"{path}: its data.pkl record is {pickle_info.file_size} bytes, more than the "
            f"{MAX_PICKLE_BYTES} a checkpoint's structure needs; refusing to unpickle it"
        )
    try:
        pickled = archive.read(pickle_info)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError):
        raise CheckpointError(
            f"{path}: corrupt PyTorch checkpoint: its data.pkl record cannot be read"
        ) from None

    storages: dict[str, _Storage] = {}
    by_storage: dict[int, _Storage] = {}  # meta StorageImpl address -> the storage it stands for
    loaded = _unpickle_structure(path, pickled, storages, by_storage)

    state_dict = find_state_dict(loaded)
    tensors = state_dict.items() if state_dict is not None else _tensors_in(loaded)
    for name, tensor in tensors:
        storage = by_storage.get(tensor.untyped_storage()._cdata)
        if storage is None:  # not backed by a record (cannot happen for torch.save output)
            raise CheckpointError(
                f"{path}: corrupt PyTorch checkpoint: tensor {name!r} has no storage record"
            )
        storage.tensors.append(name)
        _check_extent(path, name, tensor, storage)

    for storage in storages.values():
        record = f"{prefix}/data/{storage.key}"
        info = records.get(record)
        who = _who(storage)
        if info is None:
            raise CheckpointError(
                f"{path}: corrupt PyTorch checkpoint: the storage record data/{storage.key} "
                f"{who} is missing from the zip archive"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: the storage record data/{storage.key} {who} is compressed; "
                "torch.save stores records uncompressed and they are read by memory-mapping, so "
                "re-save it with torch.save or convert it to safetensors"
            )
        if info.file_size != storage.nbytes:
            raise CheckpointError(
                f"{path}: {'truncated' if info.file_size < storage.nbytes else 'corrupt'} "
                f"PyTorch checkpoint: the storage record data/{storage.key} {who} holds "
                f"{info.file_size} bytes, but the checkpoint declares {storage.nbytes} bytes "
                "for it; was it copied or downloaded completely?"
            )
        _check_record_bounds(
            path, handle, file_size, info, f"the storage record data/{storage.key} {who}"
        )


def _unpickle_structure(
    path: Path, pickled: bytes, storages: dict[str, _Storage], by_storage: dict[int, _Storage]
) -> object:
    """`data.pkl` unpickled by torch's weights-only unpickler, every storage a meta storage."""
    meta_storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: object) -> torch.storage.TypedStorage:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise _BadReference
        typename, storage_type, key, _location, numel = saved_id
        if _text(typename) != "storage" or not isinstance(numel, int) or numel < 0:
            raise _BadReference
        key = _text(key)
        if key is None:
            raise _BadReference
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        else:
            dtype = getattr(storage_type, "dtype", None)
            if not isinstance(dtype, torch.dtype):
                raise _BadReference
        if key not in meta_storages:  # shared storages are one record, referenced many times
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            untyped = torch.UntypedStorage(nbytes, device="meta")
            storages[key] = by_storage[untyped._cdata] = _Storage(key, nbytes)
            meta_storages[key] = torch.storage.TypedStorage(
                wrap_storage=untyped, dtype=dtype, _internal=True
            )
        return meta_storages[key]

    unpickler = weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        return unpickler.load()
    except _BadReference:
        raise CheckpointError(
            f"{path}: corrupt PyTorch checkpoint: its data.pkl refers to tensor data in a form "
            "torch.save does not write"
        ) from None
    except Exception as err:  # noqa: BLE001 - a corrupt pickle fails in many ways
        refused = _refused_global(err)
        if refused is not None:
            raise CheckpointError(
                f"{path}: refused: the checkpoint's pickle asks for the Python object "
                f"{refused}, and mergestream never unpickles arbitrary objects, only tensors and "
                "plain containers; save the state dict alone (torch.save(model.state_dict(), "
                "...)) or convert the checkpoint to safetensors"
            ) from None
        if isinstance(err, pickle.UnpicklingError) and "global" in str(err):
            raise CheckpointError(
                f"{path}: refused: the checkpoint's pickle asks for a Python object other than "
                "tensors and plain containers, and mergestream never unpickles arbitrary "
                "objects; save the state dict alone or convert the checkpoint to safetensors"
            ) from None
        raise CheckpointError(
            f"{path}: corrupt PyTorch checkpoint: its data.pkl is not a valid pickle of tensors "
            "(damaged, or not written by torch.save)"
        ) from None


class _BadReference(Exception):
    """A storage reference in data.pkl that torch.save would not have written."""


# torch's weights-only unpickler names a refused global as "GLOBAL module.name"; the name is
# checked against this pattern before it is repeated, so no other text of the file is quoted.
_GLOBAL_NAME = re.compile(r"GLOBAL ([A-Za-z_][\w.]{0,200})")


def _refused_global(err: Exception) -> str | None:
    if not isinstance(err, pickle.UnpicklingError):
        return None
    match = _GLOBAL_NAME.search(str(err))
    return match.group(1) if match else None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _tensors_in(loaded: object, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, object]]:
    """Every tensor in nested dicts/lists/tuples, named by its path (for files that hold no
    recognisable state dict: their records are still checked, and the caller refuses them)."""
    if isinstance(loaded, torch.Tensor):
        yield prefix or "<top level>", loaded
    elif depth < 64 and isinstance(loaded, Mapping):
        for key, value in loaded.items():
            yield from _tensors_in(value, f"{prefix}.{key}" if prefix else str(key), depth + 1)
    elif depth < 64 and isinstance(loaded, (list, tuple)):
        for i, value in enumerate(loaded):
            yield from _tensors_in(value, f"{prefix}[{i}]", depth + 1)


def _check_extent(path: Path, name: str, tensor: torch.Tensor, storage: _Storage) -> None:
    """The bytes the tensor's view spans must lie inside its storage."""
    if tensor.numel() == 0:
        return
    offset = tensor.storage_offset()
    if offset < 0 or any(s < 0 for s in tensor.stride()):
        end = None
    else:
        last = offset + sum(
            (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
        )
        end = (last + 1) * tensor.element_size()
    if end is None or end > storage.nbytes:
        raise CheckpointError(
            f"{path}: corrupt PyTorch checkpoint: tensor {name!r} "
            f"({str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, storage offset "
            f"{offset}, strides {list(tensor.stride())}) reaches beyond its storage "
            f"data/{storage.key} of {storage.nbytes} bytes"
        )


def _check_record_bounds(
    path: Path, handle: io.BufferedReader, file_size: int, info: zipfile.ZipInfo, what: str
) -> None:
    """The record's data, located through its local header as a zip reader finds it, must lie
    inside the file."""
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) == _LOCAL_HEADER.size:
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        data_start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if signature == _LOCAL_HEADER_SIGNATURE and data_start + info.compress_size <= file_size:
            return
    raise CheckpointError(
        f"{path}: truncated or corrupt PyTorch checkpoint: {what} does not lie inside the file"
    )


def _who(storage: _Storage) -> str:
    """ "of tensor 'x'" / "of tensors 'x', 'y'" for messages about a storage record."""
    if not storage.tensors:
        return "(used by no tensor of the state dict)"
    names = ", ".join(repr(n) for n in storage.tensors[:3])
    more = f" and {len(storage.tensors) - 3} more" if len(storage.tensors) > 3 else ""
    return f"of tensor {names}" if len(storage.tensors) == 1 else f"of tensors {names}{more}"
