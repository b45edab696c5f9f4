"""Safetensors files read and written one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once. Merging a large model must
not, so the writer lays out the whole header first (names, dtypes and shapes are known before
any data is computed) and then writes each tensor's bytes at its precomputed offset, in any order.
The result is an ordinary safetensors file that `safe_open` reads.

The reader checks the header against the file size when it opens a file (so a truncated or
corrupt file is refused before any work starts) and reads each tensor with `pread` into freshly
allocated memory. It deliberately does not memory-map: pages of a mapped file that were touched
stay in the process's resident set until it unmaps the file, so one pass over a mapped 2 GB
checkpoint makes a process 2 GB larger. Read into private buffers, a pass keeps only the tensors
still referenced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checksum import file_crc32

# safetensors dtype codes; the same table the format's reference implementation uses.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
        CODE_DTYPES[_code] = getattr(torch, _name)


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16 (for messages and listings)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is, without its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors arrive one at a time, in any order.

    Use as a context manager; `close()` checks that every declared tensor was written, then
    fsyncs. The file's full size is allocated when it is created (`posix_fallocate`), so a disk
    too small for it fails at once, before any tensor is computed. A writer that is not closed
    cleanly leaves a partial file behind, which callers treat as garbage (it is never renamed
    into place); `abort()` never raises, so cleanup after a failed write always runs.

    While writing, the writer keeps a CRC-32 of every tensor's bytes and a SHA-256 of the header
    (`checksums()`), so a reader can later verify what it reads at no extra pass over the data.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Iterable[tuple[str, TensorSpec]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._slots: dict[str, tuple[int, TensorSpec]] = {}
        offset = 0
        for name, spec in specs:
            if name in self._slots:
                raise ValueError(f"tensor {name!r} declared twice")
            if spec.dtype not in DTYPE_CODES:
                raise ValueError(f"tensor {name!r}: dtype {spec.dtype} cannot be stored")
            header[name] = {
                "dtype": DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self._slots[name] = (offset, spec)
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data start to 8 bytes
        prefix = struct.pack("<Q", len(encoded)) + encoded
        self._data_start = len(prefix)
        self.size = self._data_start + offset
        self.header_sha256 = hashlib.sha256(prefix).hexdigest()
        self._written: set[str] = set()
        self._rows_written: dict[str, int] = {}  # tensors written by row blocks so far
        # CRC-32 per tensor; for row blocks, chained while blocks arrive in row order
        self._crc: dict[str, int] = {}
        self._crc_next_row: dict[str, int] = {}
        self._crc_unordered: set[str] = set()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _allocate(self._fd, self.size)
            _pwrite_all(self._fd, prefix, 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise KeyError(f"tensor {name!r} was not declared for {self.path}")
        offset, spec = self._slots[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: declared {spec.dtype} {list(spec.shape)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
        self._crc[name] = self._write_at(offset, tensor, 0)
        self._written.add(name)

    def write_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Write rows `start:start + len(tensor)` of a declared tensor (along its first
        dimension). The tensor counts as written once every row has been."""
        if name not in self._slots:
            raise KeyError(f"tensor {name!r} was not declared for {self.path}")
        offset, spec = self._slots[name]
        rows = spec.shape[0] if spec.shape else 0
        if (
            tensor.dtype != spec.dtype
            or tuple(tensor.shape[1:]) != spec.shape[1:]
            or not 0 <= start <= start + tensor.shape[0] <= rows
        ):
            raise ValueError(
                f"tensor {name!r}: declared {spec.dtype} {list(spec.shape)}, got rows "
                f"{start}:{start + (tensor.shape[0] if tensor.ndim else 0)} of "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
        in_order = name not in self._crc_unordered and self._crc_next_row.get(name, 0) == start
        crc = self._write_at(
            offset + start * (spec.nbytes // rows if rows else 0),
            tensor,
            self._crc.get(name, 0) if in_order else None,
        )
        if in_order:
            self._crc[name] = crc
            self._crc_next_row[name] = start + tensor.shape[0]
        else:  # recomputed from the file at close
            self._crc_unordered.add(name)
        done = self._rows_written.get(name, 0) + tensor.shape[0]
        self._rows_written[name] = done
        if done == rows:
            self._written.add(name)

    def _write_at(self, offset: int, tensor: torch.Tensor, crc: int | None) -> int:
        """Write the tensor's bytes at `offset` of the data; returns CRC-32 chained on `crc`."""
        if self._fd is None:
            raise ValueError(f"{self.path}: write after close")
        data = memoryview(
            tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        )
        _pwrite_all(self._fd, data, self._data_start + offset)
        return zlib.crc32(data, crc) if crc is not None else 0

    def close(self) -> None:
        if self._fd is None:
            return
        missing = [n for n in self._slots if n not in self._written]
        try:
            if missing:
                raise RuntimeError(
                    f"{self.path}: {len(missing)} declared tensors were never written "
                    f"(first: {missing[0]!r})"
                )
            for name in sorted(self._crc_unordered):
                self._crc[name] = self._crc_from_file(name)
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = None

    def _crc_from_file(self, name: str) -> int:
        assert self._fd is not None
        offset, spec = self._slots[name]
        with open(self.path, "rb") as f:  # the write descriptor is write-only
            return file_crc32(f.fileno(), self._data_start + offset, spec.nbytes)

    def checksums(self) -> dict[str, object]:
        """What a reader checks the closed file against: its size, the SHA-256 of its header,
        and the CRC-32 of every tensor's bytes (hex), in data order."""
        if self._fd is not None or len(self._written) != len(self._slots):
            raise RuntimeError(f"{self.path}: checksums are known once the file is closed")
        return {
            "bytes": self.size,
            "header_sha256": self.header_sha256,
            "crc32": {name: f"{self._crc[name]:08x}" for name in self._slots},
        }

    def abort(self) -> None:
        """Close without the completeness check (the file is garbage afterwards). Never raises:
        nothing is buffered, so closing cannot fail on a full disk."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _allocate(fd: int, size: int) -> None:
    """Reserve `size` bytes for the file (a full disk fails here, not halfway through a step);
    file systems without allocation support get a sparse file of that size instead."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
    except AttributeError:  # pragma: no cover - platforms without posix_fallocate
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


# The format's reference implementation refuses headers above 100 MB; so does this reader.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """One safetensors file opened for reading: header parsed and checked, data read on demand.

    Raises `CheckpointError` naming the file (and the tensor, where one is at fault) for a missing,
    truncated or corrupt file, or a tensor whose dtype this library cannot represent.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot open ({err.strerror})") from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _parse(self) -> None:
        assert self._fd is not None
        file_size = os.fstat(self._fd).st_size
        if file_size < 8:
            raise self._fail(f"not a safetensors file (only {file_size} bytes)")
        header_len = struct.unpack("<Q", _pread_exact(self._fd, 8, 0))[0]
        # The declared length is bytes of the file: it is compared, never quoted, so that a
        # file opened by mistake (or by a hostile index) does not leak its content in a message.
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(
                "not a safetensors file: its first 8 bytes do not declare a header length "
                f"within the format's limit of {MAX_HEADER_BYTES} bytes"
            )
        if 8 + header_len > file_size:
            raise self._fail(
                "not a safetensors file, or truncated: the header length its first 8 bytes "
                f"declare runs past the end of the file ({file_size} bytes)"
            )
        raw = _pread_exact(self._fd, header_len, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise self._fail(
                f"corrupt safetensors header (not UTF-8 text at header byte {err.start})"
            ) from None
        except json.JSONDecodeError as err:
            raise self._fail(
                f"corrupt safetensors header (not JSON: {err.msg} at header byte {err.pos})"
            ) from None
        except RecursionError:
            raise self._fail("corrupt safetensors header (JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._fail("corrupt safetensors header (__metadata__ is not an object)")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in metadata.items()}
        self._data_start = 8 + header_len
        data_size = file_size - self._data_start
        entries: list[tuple[int, int, str, TensorSpec]] = []
        for name, entry in header.items():
            entries.append((*self._check_entry(name, entry), name, self._spec(name, entry)))
        entries.sort(key=lambda e: (e[0], e[1]))
        previous_end, previous_name = 0, None
        for begin, end, name, spec in entries:
            if end - begin != spec.nbytes:
                raise self._fail(
                    f"corrupt header: tensor {_short(name)} is {dtype_name(spec.dtype)} "
                    f"{list(spec.shape)} ({spec.nbytes} bytes) but its data_offsets span "
                    f"{end - begin} bytes"
                )
            if begin < previous_end:
                raise self._fail(
                    f"corrupt header: the data of tensor {_short(name)} overlaps that of "
                    f"{_short(previous_name)}"
                )
            if end > data_size:
                raise self._fail(
                    f"truncated: tensor {_short(name)} needs bytes up to "
                    f"{self._data_start + end} but "
                    f"the file has only {file_size} (expected at least "
                    f"{self._data_start + entries[-1][1]}); was it copied or downloaded completely?"
                )
            previous_end, previous_name = end, name
        self._entries = {name: (begin, spec) for begin, _, name, spec in entries}

    def _check_entry(self, name: str, entry: object) -> tuple[int, int]:
        if not isinstance(entry, dict) or not isinstance(entry.get("data_offsets"), list):
            raise self._fail(f"corrupt header: tensor {_short(name)} has no data_offsets")
        offsets = entry["data_offsets"]
        if (
            len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(
                f"corrupt header: tensor {_short(name)} has data_offsets {_short(offsets)}"
            )
        return offsets[0], offsets[1]

    def _spec(self, name: str, entry: dict) -> TensorSpec:
        code = entry.get("dtype")
        if code not in CODE_DTYPES:
            raise self._fail(
                f"tensor {_short(name)} has dtype {_short(code)}, which mergestream cannot read"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self._fail(f"corrupt header: tensor {_short(name)} has shape {_short(shape)}")
        return TensorSpec(CODE_DTYPES[code], tuple(shape))

    def names(self) -> list[str]:
        """Tensor names in the order their data lies in the file."""
        return list(self._entries)

    def spec(self, name: str) -> TensorSpec:
        return self._entries[name][1]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in newly allocated memory that the caller owns."""
        spec = self._entries[name][1]
        return self._read_bytes(name, 0, spec.nbytes).view(spec.dtype).reshape(spec.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a tensor (along its first dimension), in new memory; a 0-D
        tensor has no rows."""
        spec = self._entries[name][1]
        if not spec.shape:
            raise ValueError(f"tensor {name!r} is 0-D and has no rows")
        rows = spec.shape[0]
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"rows {start}:{stop} are outside tensor {name!r}'s {rows} rows")
        row_bytes = spec.nbytes // rows if rows else 0
        data = self._read_bytes(name, start * row_bytes, (stop - start) * row_bytes)
        return data.view(spec.dtype).reshape(stop - start, *spec.shape[1:])

    def _read_bytes(self, name: str, offset: int, size: int) -> torch.Tensor:
        """`size` bytes of tensor `name`'s data from `offset` on, as a new uint8 tensor."""
        if self._fd is None:
            raise self._fail("read after close")
        buffer = torch.empty(size, dtype=torch.uint8)
        try:
            _pread_into(self._fd, buffer, self._data_start + self._entries[name][0] + offset)
        except OSError as err:
            raise self._fail(f"cannot read tensor {name!r} ({err.strerror or err})") from None
        except EOFError:
            raise self._fail(
                f"truncated: the file ended while reading tensor {name!r} (it shrank after it "
                "was opened?)"
            ) from None
        return buffer

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _short(value: object, limit: int = 200) -> str:
    """repr of a value from a header, cut short: messages name things, they do not dump them."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    buffer = torch.empty(size, dtype=torch.uint8)
    _pread_into(fd, buffer, offset)
    return buffer.numpy().tobytes()


def _pread_into(fd: int, buffer: torch.Tensor, offset: int) -> None:
    """Fill a uint8 tensor from `fd` at `offset`; EOFError if the file ends first."""
    view = memoryview(buffer.numpy())
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, min(len(view) - done, 1 << 30), offset + done)
            n = len(chunk)
            view[done : done + n] = chunk
        if n == 0:
            raise EOFError
        done += n
