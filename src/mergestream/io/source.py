"""The reader contract every checkpoint fulfils, and the simplest reader of all.

A `TensorSource` lists tensor names and specs from file headers alone, and reads one tensor's data
only when asked. Peak memory while merging is therefore a few tensors, whatever the model size.
The file readers (`checkpoint.py`), the name mapping (`mapping.py`) and LoRA adapters
(`lora.py`) all answer it; `open.py` picks the right one for a path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from .safetensors_stream import TensorSpec


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


def tensor_location(source: TensorSource, name: str) -> str:
    """Where tensor `name` lives, for messages: its file if the source knows it."""
    file_of = getattr(source, "file_of", None)
    if file_of is not None:
        try:
            return str(file_of(name))
        except KeyError:
            pass
    return source.description
