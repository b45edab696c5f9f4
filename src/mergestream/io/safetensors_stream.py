"""A safetensors writer that streams tensors to disk one at a time.

`safetensors.torch.save_file` needs every tensor in memory at once. Merging a large model must
not, so this writer lays out the whole header first (names, dtypes and shapes are known before
any data is computed) and then writes each tensor's bytes at its precomputed offset, in any order.
The result is an ordinary safetensors file that `safe_open` reads.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

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
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
        CODE_DTYPES[_code] = getattr(torch, _name)


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

    Use as a context manager; `close()` checks that every declared tensor was written, flushes
    and fsyncs. A writer that is not closed cleanly leaves a partial file behind, which callers
    treat as garbage (it is never renamed into place).
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
        self._data_start = 8 + len(encoded)
        self._written: set[str] = set()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise KeyError(f"tensor {name!r} was not declared for {self.path}")
        offset, spec = self._slots[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: declared {spec.dtype} {list(spec.shape)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        if self._file.closed:
            return
        missing = [n for n in self._slots if n not in self._written]
        try:
            if missing:
                raise RuntimeError(
                    f"{self.path}: {len(missing)} declared tensors were never written "
                    f"(first: {missing[0]!r})"
                )
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without the completeness check (the file is garbage afterwards)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
