"""Opening any checkpoint: the one place that knows every input format.

A path is a PEFT LoRA adapter folder (`lora.py`), or weight files: a `.safetensors` file, a
PyTorch `.bin`/`.pt`/`.pth` state dict, an HF model directory or a shard index
(`checkpoint.py`); an in-memory state dict is wrapped as it is (`source.MemorySource`).

`open_fitted` opens a checkpoint for a merge into a given base: the input in the base's names
(an adapter bound to the base, or weights renamed by a `NameMapping`), checked against the base
from headers alone, and able to say what it is and how the ledger records it, so nothing above
asks the format again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint import SAFETENSORS_INDEX, TORCH_INDEX, open_weight_files
from .lora import LoraAdapter, LoraSource, base_identity, is_adapter_dir, open_adapter
from .mapping import MappedSource, NameMapping, apply_mapping, mismatch_hint
from .safetensors_stream import dtype_name
from .source import MemorySource, TensorSource, tensor_location

CheckpointLike = str | os.PathLike[str] | Mapping[str, torch.Tensor]


def open_checkpoint(checkpoint: CheckpointLike) -> TensorSource:
    """Open a checkpoint path (file or HF model directory) or wrap an in-memory state dict."""
    if isinstance(checkpoint, Mapping):
        return MemorySource(checkpoint)
    path = Path(checkpoint)
    if is_adapter_dir(path):  # a PEFT LoRA adapter: fitted to the base by MergeState
        return open_adapter(path)
    return open_weight_files(path)


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


@dataclass(frozen=True)
class FittedCheckpoint:
    """A checkpoint opened for a merge into a base (`open_fitted`): `raw` as stored, `source`
    in the base's names; `path` is how the ledger names it (the resolved path, or an in-memory
    dict's description). Close it when done (`close`)."""

    raw: TensorSource
    source: TensorSource
    path: str

    @property
    def is_adapter(self) -> bool:
        """A PEFT LoRA adapter, whose task vectors come from its factors."""
        return isinstance(self.source, LoraSource)

    @property
    def description(self) -> str:
        return self.source.description

    def ledger_fields(self) -> dict[str, Any]:
        """What the ledger records about how the input was read: the mapping applied to its
        names, or the adapter's summary (rank, scaling, modules)."""
        if isinstance(self.source, MappedSource):
            return {"mapping": self.source.summary()}
        if isinstance(self.source, LoraSource):
            return {"adapter": self.source.summary()}
        return {}

    def size(self) -> int:
        """Bytes of the input's files (0 for a state dict in memory)."""
        return sum(path.stat().st_size for path in self.source.files())

    def close(self) -> None:
        self.raw.close()


def open_fitted(
    checkpoint: CheckpointLike,
    base: TensorSource,
    mapping: NameMapping,
    *,
    base_path: str,
    base_dir: Path | None,
    force_base: bool = False,
) -> FittedCheckpoint:
    """Open `checkpoint` in the names of `base` (recorded as `base_path`, its folder
    `base_dir`), checked against the base from headers alone, so that a misfit is refused
    before anything is read or hashed. An adapter must name this base
    (`base_model_name_or_path`) unless `force_base`."""
    raw = open_checkpoint(checkpoint)
    try:
        if isinstance(raw, LoraAdapter):  # task vectors from its factors, in the base's names
            source = raw.bind(base, mapping, base_identity(base_path, base_dir), force_base)
        else:
            source = apply_mapping(raw, mapping, base)
        check_compatible(base, source)
    except BaseException:
        raw.close()
        raise
    path = source.description if isinstance(checkpoint, Mapping) else str(
        Path(checkpoint).resolve()
    )
    return FittedCheckpoint(raw, source, path)


def check_compatible(base: TensorSource, checkpoint: TensorSource) -> None:
    """Refuse a checkpoint whose tensors do not match the base, naming the first offender (and
    the option that would map the checkpoint onto the base, where one fits)."""
    incoming = checkpoint.names()
    incoming_set = set(incoming)
    base_names = base.names()
    base_set = set(base_names)
    float_names = [n for n in base_names if base.spec(n).dtype.is_floating_point]
    missing = [n for n in float_names if n not in incoming_set]
    extra = [n for n in incoming if n not in base_set]
    if missing or extra:

        def first(names: list[str], what: str) -> str:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            return f"tensor {names[0]!r} {what}{more}"

        problems = []
        if missing:
            problems.append(first(missing, "of the base is missing"))
        if extra:
            problems.append(first(extra, "is not in the base"))
        problem = "; ".join(problems)
        buffers = base_set.difference(float_names)  # integer buffers: never merged
        hint = mismatch_hint(float_names, incoming, buffers)
        raise CheckpointError(
            f"{checkpoint.description}: {problem}" + (f". Hint: {hint}" if hint else "")
        )
    for name in float_names:
        spec = base.spec(name)
        other = checkpoint.spec(name)
        if other.shape != spec.shape:
            raise CheckpointError(
                f"{tensor_location(checkpoint, name)}: tensor {name!r} has shape "
                f"{list(other.shape)}, the base has {list(spec.shape)}"
            )
        if not other.dtype.is_floating_point:
            raise CheckpointError(
                f"{tensor_location(checkpoint, name)}: tensor {name!r} has dtype "
                f"{dtype_name(other.dtype)}, which cannot be cast to the base's "
                f"{dtype_name(spec.dtype)} for merging (integer, boolean and complex tensors "
                "carry no task vector)"
            )
